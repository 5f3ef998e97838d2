//! The chat UI in a real browser: headless Chromium driven over WebDriver (fantoccini and
//! Debian's chromedriver) against the real server and the mock upstream.
//!
//! Each scenario is a test of its own, with its own server and browsers; all share one
//! chromedriver, started by the first of them, and a few run at a time.
//! Screenshots of the main views go to `target/ui-screenshots/`; a failing scenario also
//! leaves `FAILED-<scenario>-<n>.png` there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::env::TestEnv;
use common::reasoning::{answer, reasoning_upstream, thinking};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use sluice::config::{AuthMode, Config, ProviderConfig};
use sluice_mock::{Fault, MockConfig, MockServer, full_reply};
use tokio_util::sync::CancellationToken;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Browsers running at once: a headless Chromium wants most of a core while it starts.
const PARALLEL: usize = 3;
/// Upper bound for anything the browser is waited on for.
const UI_WAIT: Duration = Duration::from_secs(15);
/// A scenario that takes longer than this is stuck; it fails instead of hanging the run.
const SCENARIO_LIMIT: Duration = Duration::from_secs(50);
/// For a failure screenshot and closing a browser.
const CLEANUP: Duration = Duration::from_secs(5);
/// Between two looks at the DOM when a wait is not about catching intermediate states.
const POLL: Duration = Duration::from_millis(25);

// WebDriver key codes. Modifiers toggle: SHIFT, ENTER, SHIFT is Shift+Enter.
const ENTER: &str = "\u{e007}";
const SHIFT: &str = "\u{e008}";
const ESCAPE: &str = "\u{e00c}";

/// Script lines that put the last reply as the page shows it (text, status, the words
/// under it, the error box) in `reply`; a macro so `concat!` can build on it.
macro_rules! last_reply {
    () => {
        "const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();
         const err = m?.querySelector('.msg-error');
         const reply = m ? {
           text: m.querySelector('.body').textContent,
           status: m.dataset.status,
           meta: m.querySelector('.meta').textContent,
           error: err.hidden ? null : err.textContent,
         } : {text: null, status: null};"
    };
}

const LAST_REPLY_JS: &str = concat!(last_reply!(), "return reply;");

type Scenario = fn(Arc<Ctx>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// One test per scenario, named as the scenario, played by [`play`].
macro_rules! scenarios {
    ($($name:ident => $scene:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            crate::require!(Chromium);
            play(stringify!($name), |ctx| Box::pin($scene(ctx))).await;
        }
    )*};
}

scenarios![
    reply_streams_token_by_token => reply_streams_token_by_token_scene,
    stop_button_and_escape_stop_the_reply => stop_button_and_escape_stop_the_reply_scene,
    a_late_history_read_does_not_undo_an_ended_reply => a_late_history_read_does_not_undo_an_ended_reply_scene,
    reload_mid_reply_completes_exactly_once => reload_mid_reply_completes_exactly_once_scene,
    network_drop_mid_reply_resumes_without_a_gap => network_drop_mid_reply_resumes_without_a_gap_scene,
    two_windows_show_the_same_reply_live => two_windows_show_the_same_reply_live_scene,
    markup_in_replies_renders_as_text => markup_in_replies_renders_as_text_scene,
    task_progress_and_result_over_websocket => task_progress_and_result_over_websocket_scene,
    admin_view_for_admin_keys_only => admin_view_for_admin_keys_only_scene,
    phone_width_layout => phone_width_layout_scene,
    upstream_failure_shows_plain_words_and_retries => upstream_failure_shows_plain_words_and_retries_scene,
    demo_provider_out_of_the_box => demo_provider_out_of_the_box_scene,
    reasoning_shows_collapsed_above_the_answer => reasoning_shows_collapsed_above_the_answer_scene,
    websocket_closes_cleanly_in_the_browser => websocket_closes_cleanly_in_the_browser_scene,
    task_eventsource_stops_after_the_result => task_eventsource_stops_after_the_result_scene,
    model_picker_picks_the_replying_model_per_chat => model_picker_picks_the_replying_model_per_chat_scene,
    deep_nesting_renders_and_the_next_reply_too => deep_nesting_renders_and_the_next_reply_too_scene,
];

/// Browsers running at once across all scenario tests.
static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(PARALLEL);

/// Runs one scenario in its own task, so a panic is reported with its message, closes every
/// browser it opened (after a screenshot if it failed), then fails the test if it failed.
async fn play(name: &'static str, scenario: Scenario) {
    let driver = Driver::shared().await;
    let _turn = RUNNING.acquire().await.unwrap();
    std::fs::create_dir_all(shots_dir()).unwrap();
    for f in std::fs::read_dir(shots_dir()).unwrap().flatten() {
        if f.file_name()
            .to_string_lossy()
            .starts_with(&format!("FAILED-{name}-"))
        {
            let _ = std::fs::remove_file(f.path());
        }
    }
    let ctx = Arc::new(Ctx {
        driver,
        browsers: Mutex::new(Vec::new()),
    });
    let task = tokio::spawn(scenario(ctx.clone()));
    let abort = task.abort_handle();
    let result = match tokio::time::timeout(SCENARIO_LIMIT, task).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is_panic() => {
            let p = e.into_panic();
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panicked".into()))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => {
            abort.abort();
            Err(format!("did not finish within {SCENARIO_LIMIT:?}"))
        }
    };
    // Bounded: a page that hangs (a script in a loop) must not hang the test.
    let browsers = std::mem::take(&mut *ctx.browsers.lock().unwrap());
    for (i, b) in browsers.into_iter().enumerate() {
        if result.is_err() {
            if let Ok(Ok(png)) = tokio::time::timeout(CLEANUP, b.screenshot()).await {
                let _ = std::fs::write(shots_dir().join(format!("FAILED-{name}-{i}.png")), png);
            }
        }
        let _ = tokio::time::timeout(CLEANUP, b.close()).await;
    }
    if let Err(e) = result {
        panic!("{name}: {e}; screenshots in {}", shots_dir().display());
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Sign in (a wrong key is refused), send with Enter (Shift+Enter is a new line), watch the
/// reply grow in the DOM, see usage and time to first token; then rename and delete the
/// chat in the sidebar.
async fn reply_streams_token_by_token_scene(ctx: Arc<Ctx>) {
    let n = 30;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            first_token_delay: Duration::from_millis(150),
            token_delay: Duration::from_millis(60),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let key = api_key(&server, "alice", false).await;
    let c = ctx.browser().await;
    c.goto(&format!("{}/", server.url)).await.unwrap();
    let input = wait_css(&c, "#signin:not([hidden]) #signin-key").await;
    screenshot(&c, "signin").await;
    input.send_keys("sk-not-a-key").await.unwrap();
    click(&c, "#signin-submit").await;
    let refused = wait_css(&c, "#signin-error:not([hidden])").await;
    assert!(
        refused.text().await.unwrap().contains("not accepted"),
        "a wrong key is refused in plain words"
    );
    sign_in(&c, &server.url, &key).await;
    wait_css(&c, "#chat-empty:not([hidden]) #agent").await;

    type_into(
        &c,
        "#input",
        &format!("First line{SHIFT}{ENTER}{SHIFT}second line{ENTER}"),
    )
    .await;
    let full = full_reply(n);
    let seen = watch_reply(&c, &full).await;
    let partial: Vec<&String> = seen
        .iter()
        .filter(|t| !t.is_empty() && t.len() < full.len())
        .collect();
    assert!(
        partial.len() >= 3,
        "the reply should appear progressively; intermediate states seen: {partial:?}"
    );
    assert_eq!(seen.last().unwrap().trim_end(), full.trim_end());
    assert_eq!(
        texts(&c, "#messages .msg.user .body").await,
        vec!["First line\nsecond line"],
        "Shift+Enter made a new line and Enter sent"
    );
    let meta = wait_js(
        &c,
        "usage and time to first token under the reply",
        "const m = document.querySelector('#messages .msg.assistant .meta');
         return m && m.querySelector('.usage') && m.querySelector('.ttft') ? m.textContent : null;",
        Value::is_string,
    )
    .await;
    let meta = meta.as_str().unwrap();
    assert!(meta.contains(&format!("{n} tokens")), "usage shown: {meta}");
    assert!(meta.contains("first token"), "TTFT shown: {meta}");
    wait_js(
        &c,
        "the chat in the sidebar, titled by its first line",
        "return [...document.querySelectorAll('#sessions .session-title')].map(e => e.textContent);",
        |v| v == &json!(["First line"]),
    )
    .await;
    screenshot(&c, "chat").await;

    // Rename in place (the old title starts selected, so typing replaces it; WebDriver's
    // clear would blur the field, which saves), Enter saves; the header follows.
    click(&c, "#sessions .session-rename").await;
    type_into(
        &c,
        "#sessions .session-rename-input",
        &format!("Lisbon trip{ENTER}"),
    )
    .await;
    wait_js(
        &c,
        "the renamed chat",
        "return [document.querySelector('#sessions .session-title')?.textContent,
                 document.querySelector('#view-title .title-text')?.textContent];",
        |v| v == &json!(["Lisbon trip", "Lisbon trip"]),
    )
    .await;

    // Delete takes a second click to confirm.
    click(&c, "#sessions .session-delete").await;
    click(&c, "#sessions .session-delete.confirm").await;
    wait_js(
        &c,
        "the chat gone from the sidebar and a new chat open",
        "return [document.querySelector('#sessions')?.textContent, location.hash];",
        |v| v == &json!(["No chats yet.", "#/new"]),
    )
    .await;
    let left: Value = client()
        .get(format!("{}/api/sessions", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        left["data"],
        json!([]),
        "the session was deleted on the server"
    );
    ctx.finish(server).await;
}

/// The Stop button ends a reply mid-way, keeping exactly the text shown; Esc does the same.
async fn stop_button_and_escape_stop_the_reply_scene(ctx: Arc<Ctx>) {
    let n = 400;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            token_delay: Duration::from_millis(30),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let key = api_key(&server, "bob", false).await;
    let c = ctx.browser().await;
    sign_in(&c, &server.url, &key).await;
    let full = full_reply(n);

    type_into(&c, "#input", &format!("Tell me a long story{ENTER}")).await;
    wait_reply_longer_than(&c, 20).await;
    click(&c, "#stop").await;
    let stopped = wait_js(&c, "the reply marked stopped", LAST_REPLY_JS, |v| {
        v["status"] == "cancelled" && v["meta"].as_str().unwrap_or("").contains("Stopped")
    })
    .await;
    let shown = stopped["text"].as_str().unwrap().to_owned();
    assert!(
        !shown.is_empty() && shown.len() < full.len() && full.starts_with(&shown),
        "the stopped reply keeps a part of the text: {shown:?}"
    );
    wait_css(&c, "#send:not([hidden])").await;
    let session = session_id(&c).await;
    let stored = messages(&server, &key, &session).await;
    let reply = stored.last().unwrap();
    assert_eq!(reply["status"], "cancelled");
    assert_eq!(
        reply["content"].as_str().unwrap(),
        shown,
        "the server kept exactly the text the page shows"
    );

    type_into(&c, "#input", &format!("Another one{ENTER}")).await;
    wait_js(&c, "the second reply streaming", LAST_REPLY_JS, |v| {
        v["status"] == "streaming" && v["text"].as_str().is_some_and(|t| t.len() > 10)
    })
    .await;
    type_into(&c, "#input", ESCAPE).await;
    wait_js(&c, "Esc to stop the reply", LAST_REPLY_JS, |v| {
        v["status"] == "cancelled"
    })
    .await;
    assert_eq!(
        texts(&c, "#messages .msg.assistant").await.len(),
        2,
        "both replies stay in the conversation"
    );
    ctx.finish(server).await;
}

/// A history read the page made while a reply streamed, answered then but delivered after
/// the reply ended (a slow network), leaves the ended reply as the feed showed it: before,
/// the reply went back to the store's empty `streaming` state and stayed there.
async fn a_late_history_read_does_not_undo_an_ended_reply_scene(ctx: Arc<Ctx>) {
    let n = 20;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            token_delay: Duration::from_millis(30),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let key = api_key(&server, "erin", false).await;
    let session: Value = client()
        .post(format!("{}/api/sessions", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = session["id"].as_str().unwrap().to_owned();
    let c = ctx.browser().await;
    sign_in(&c, &server.url, &key).await;
    c.goto(&format!("{}/#/chat/{session}", server.url))
        .await
        .unwrap();
    wait_css(&c, "#input").await;
    // From here every history read reaches the page 1.5 s after the server answered it.
    js(
        &c,
        "window.__late = 0;
         window.__histories = 0;
         // Merges of a history read that came late (or of one after it).
         document.addEventListener('sluice:history', () => {
           if (window.__late > 0) window.__histories += 1;
         });
         const real = window.fetch;
         window.fetch = async (url, opts) => {
           const r = await real(url, opts);
           if (!String(url).endsWith('/messages') || (opts?.method ?? 'GET') !== 'GET') return r;
           const body = await r.text();
           await new Promise((ok) => setTimeout(ok, 1500));
           window.__late += 1;
           return new Response(body, { status: r.status, headers: r.headers });
         };
         return true;",
    )
    .await;
    // Another client sends the message: the page learns of the reply from its start event
    // and reads the history then, while the reply streams.
    let r = client()
        .post(format!("{}/api/sessions/{session}/messages", server.url))
        .bearer_auth(&key)
        .json(&json!({"content": "Hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let full = full_reply(n);
    wait_js(&c, "the reply complete", LAST_REPLY_JS, |v| {
        v["status"] == "complete" && v["text"] == full.as_str()
    })
    .await;
    wait_js(
        &c,
        "the late history read merged",
        "return window.__histories;",
        |v| v.as_u64().is_some_and(|n| n >= 1),
    )
    .await;
    let after = js(&c, LAST_REPLY_JS).await;
    assert_eq!(after["status"], "complete", "{after}");
    assert_eq!(after["text"], full.as_str(), "{after}");
    ctx.finish(server).await;
}

/// A reload in the middle of a reply resumes from the last event id: the reply completes
/// once, with no gap and no repeated word.
async fn reload_mid_reply_completes_exactly_once_scene(ctx: Arc<Ctx>) {
    let n = 45;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            token_delay: Duration::from_millis(50),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let key = api_key(&server, "carol", false).await;
    let c = ctx.browser().await;
    sign_in(&c, &server.url, &key).await;
    type_into(&c, "#input", &format!("Hello{ENTER}")).await;
    wait_reply_longer_than(&c, 15).await;
    let snapshot = wait_js(
        &c,
        "a resume point in sessionStorage",
        "const k = Object.keys(sessionStorage).find(k => k.startsWith('sluice.resume.'));
         return k ? JSON.parse(sessionStorage.getItem(k)) : null;",
        |v| v["lastId"].is_string(),
    )
    .await;
    c.refresh().await.unwrap();
    let full = full_reply(n);
    let seen = watch_reply(&c, &full).await;
    assert_eq!(seen.last().unwrap().trim_end(), full.trim_end());
    assert!(
        seen.iter().any(|t| t.len() < full.len()),
        "the reload happened before the reply ended (snapshot {snapshot})"
    );
    assert_eq!(texts(&c, "#messages .msg.assistant").await.len(), 1);
    assert_eq!(texts(&c, "#messages .msg.user").await.len(), 1);
    let left = js(
        &c,
        "return Object.keys(sessionStorage).filter(k => k.startsWith('sluice.resume.')).length;",
    )
    .await;
    assert_eq!(
        left,
        json!(0),
        "the resume point is dropped once the reply is done"
    );
    ctx.finish(server).await;
}

/// The network drops mid-reply (every connection through a proxy is cut): the page says
/// it is reconnecting, resumes from the last event id and completes the reply with no gap
/// and no repeated word.
async fn network_drop_mid_reply_resumes_without_a_gap_scene(ctx: Arc<Ctx>) {
    let n = 60;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            token_delay: Duration::from_millis(50),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let key = api_key(&server, "ivan", false).await;
    let proxy = CutProxy::start(&server.url).await;
    let c = ctx.browser().await;
    sign_in(&c, &proxy.url, &key).await;
    type_into(&c, "#input", &format!("Hello{ENTER}")).await;
    wait_reply_longer_than(&c, 20).await;
    proxy.cut();

    let full = full_reply(n);
    let script = concat!(
        last_reply!(),
        "const conn = document.querySelector('#conn');
         return {...reply, conn: conn.hidden ? '' : conn.textContent};"
    );
    let mut seen: Vec<String> = Vec::new();
    let mut reconnecting = false;
    let deadline = Instant::now() + UI_WAIT;
    loop {
        let v = js(&c, script).await;
        reconnecting |= v["conn"]
            .as_str()
            .is_some_and(|t| t.starts_with("Reconnecting"));
        let text = v["text"].as_str().unwrap_or_default();
        assert!(
            full.starts_with(text),
            "not a prefix of the reply: {text:?}"
        );
        assert!(
            text.len() >= seen.last().map_or(0, String::len),
            "the reply went back: it restarted instead of resuming"
        );
        if seen.last().map(String::as_str) != Some(text) {
            seen.push(text.to_owned());
        }
        if v["status"] == "complete" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reply never completed: {seen:?}"
        );
    }
    assert!(reconnecting, "the page said it was reconnecting");
    assert_eq!(seen.last().unwrap().trim_end(), full.trim_end());
    assert_eq!(texts(&c, "#messages .msg.assistant").await.len(), 1);
    assert!(proxy.cuts() >= 1, "connections were cut");
    ctx.finish(server).await;
}

/// Two windows on one session: a reply sent from one shows live in the other, with the
/// same text.
async fn two_windows_show_the_same_reply_live_scene(ctx: Arc<Ctx>) {
    let n = 40;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            token_delay: Duration::from_millis(50),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let key = api_key(&server, "dave", false).await;
    let (a, b) = tokio::join!(ctx.browser(), ctx.browser());
    tokio::join!(
        sign_in(&a, &server.url, &key),
        sign_in(&b, &server.url, &key)
    );
    let full = full_reply(n);
    type_into(&a, "#input", &format!("First{ENTER}")).await;
    watch_reply(&a, &full).await;
    let session = session_id(&a).await;

    b.goto(&format!("{}/#/chat/{session}", server.url))
        .await
        .unwrap();
    wait_js(&b, "the first reply in window B", LAST_REPLY_JS, |v| {
        v["status"] == "complete"
    })
    .await;
    type_into(&a, "#input", &format!("Second{ENTER}")).await;
    // B never sent anything: it must show A's reply as it streams.
    let (seen_a, seen_b) =
        tokio::join!(watch_second_reply(&a, &full), watch_second_reply(&b, &full));
    assert!(
        seen_b.iter().any(|t| !t.is_empty() && t.len() < full.len()),
        "window B showed the reply live, not only at the end: {seen_b:?}"
    );
    assert_eq!(
        seen_a.last(),
        seen_b.last(),
        "both windows show the same text"
    );
    assert_eq!(seen_b.last().unwrap().trim_end(), full.trim_end());
    let users = wait_js(
        &b,
        "A's message in window B",
        "return [...document.querySelectorAll('#messages .msg.user .body')].map(e => e.textContent);",
        |v| v == &json!(["First", "Second"]),
    )
    .await;
    assert_eq!(users, json!(["First", "Second"]));
    wait_js(
        &b,
        "the chat in window B's sidebar",
        "return [...document.querySelectorAll('#sessions .session-title')].map(e => e.textContent);",
        |v| v == &json!(["First"]),
    )
    .await;
    screenshot(&b, "two-windows").await;
    ctx.finish(server).await;
}

/// Model output with `<script>`, `<img onerror>` and a `javascript:` link renders as text;
/// Markdown (code blocks, bold, inline code) still renders.
async fn markup_in_replies_renders_as_text_scene(ctx: Arc<Ctx>) {
    let upstream = markup_upstream().await;
    let mut cfg = base_config();
    cfg.upstream.providers = vec![ProviderConfig::openai("markup", &upstream, None)];
    cfg.chat.auth = AuthMode::Required;
    cfg.chat.default_model = "markup-model".into();
    let server = TestServer::start(cfg).await;
    let key = api_key(&server, "erin", false).await;
    let c = ctx.browser().await;
    sign_in(&c, &server.url, &key).await;
    type_into(&c, "#input", &format!("Show me some HTML{ENTER}")).await;
    wait_js(&c, "the reply", LAST_REPLY_JS, |v| {
        v["status"] == "complete"
    })
    .await;

    let r = js(
        &c,
        "const m = document.querySelector('#messages');
         return {
           text: m.querySelector('.msg.assistant .body p').textContent,
           injected: m.querySelectorAll('script, img, iframe, b, i, [onerror]').length,
           badLinks: [...m.querySelectorAll('a')].filter(a => !/^https?:$/.test(a.protocol)).length,
           code: m.querySelector('.code pre code')?.textContent,
           strong: m.querySelector('.body strong')?.textContent,
           inline: m.querySelector('.body p > code')?.textContent,
           pwned: window.__pwned ?? null,
         };",
    )
    .await;
    assert_eq!(
        r["text"],
        "Look: <script>window.__pwned = 1</script> and <img src=x onerror=\"window.__pwned = 2\"> \
         and a link and <b>not bold</b>.",
        "markup shows as the characters the model sent"
    );
    assert_eq!(r["injected"], 0, "no element was created from model output");
    assert_eq!(r["badLinks"], 0, "no javascript: link");
    assert_eq!(r["pwned"], Value::Null, "no script ran");
    assert_eq!(r["code"], "<script>alert(1)</script>");
    assert_eq!(r["strong"], "done");
    assert_eq!(r["inline"], "<i>code</i>");
    screenshot(&c, "markup-as-text").await;
    ctx.finish(server).await;
}

/// With auth off the page opens straight in. Run a scene with variables; the task's
/// progress shows live over the WebSocket, then its result.
async fn task_progress_and_result_over_websocket_scene(ctx: Arc<Ctx>) {
    let n = 64;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            first_token_delay: Duration::from_millis(100),
            token_delay: Duration::from_millis(25),
            ..Default::default()
        },
        |c| c.chat.auth = AuthMode::Off,
    )
    .await;
    let created = client()
        .post(format!("{}/api/scenes", server.url))
        .json(&json!({"name": "brief", "agent": "default", "template": "Explain {{topic}} to {{audience}}."}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let c = ctx.browser().await;
    c.goto(&format!("{}/#/tasks", server.url)).await.unwrap();
    wait_css(&c, "#shell:not([hidden])").await;
    assert!(
        !c.find(Locator::Css("#signin"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "no sign-in when auth is off"
    );
    wait_css(&c, "#scene option[value=brief]").await;
    type_into(&c, "input[data-var=topic]", "tides").await;
    type_into(&c, "input[data-var=audience]", "children").await;
    click(&c, "#run-task").await;

    let mut states: Vec<Value> = Vec::new();
    let deadline = Instant::now() + UI_WAIT;
    loop {
        let s = js(
            &c,
            "const t = document.querySelector('#task-list .task');
             return t ? {status: t.dataset.status, tokens: t.querySelector('.task-tokens').textContent,
                         result: t.querySelector('.task-result').textContent} : null;",
        )
        .await;
        if !s.is_null() && states.last() != Some(&s) {
            states.push(s.clone());
        }
        if s["status"] == "succeeded" || s["status"] == "failed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the task never ended: {states:?}"
        );
    }
    assert!(
        states.iter().any(|s| s["status"] == "running"
            && s["tokens"].as_str().is_some_and(|t| t.ends_with(" tokens"))),
        "progress showed while the task ran: {states:?}"
    );
    let last = states.last().unwrap();
    assert_eq!(last["status"], "succeeded");
    assert_eq!(
        last["result"].as_str().unwrap().trim_end(),
        full_reply(n).trim_end()
    );
    let timeline = texts(&c, "#task-list .task .timeline li").await;
    assert!(timeline.iter().any(|t| t == "Running"), "{timeline:?}");
    assert!(
        timeline.iter().any(|t| t.starts_with("Progress: ")),
        "{timeline:?}"
    );
    assert_eq!(timeline.last().map(String::as_str), Some("Succeeded"));
    screenshot(&c, "tasks").await;
    ctx.finish(server).await;
}

/// The browser's own WebSocket: a close it starts is answered (1000, clean, not 1006),
/// and a close the server starts reaches it with its code and reason, also clean.
async fn websocket_closes_cleanly_in_the_browser_scene(ctx: Arc<Ctx>) {
    let (_mock, server) = env(MockConfig::default(), |c| c.chat.auth = AuthMode::Off).await;
    let c = ctx.browser().await;
    c.goto(&server.url).await.unwrap();
    wait_css(&c, "#shell:not([hidden])").await;
    js(
        &c,
        "window.__closes = {};
         const open = (who, then) => {
           const ws = new WebSocket(location.origin.replace(/^http/, 'ws') + '/ws');
           ws.onopen = () => then(ws);
           ws.onclose = (e) => { window.__closes[who] = {code: e.code, clean: e.wasClean, reason: e.reason}; };
         };
         open('client', (ws) => ws.close(1000, 'done'));
         open('server', (ws) => ws.send(new Uint8Array([0])));",
    )
    .await;
    let closes = wait_js(
        &c,
        "both WebSockets to close",
        "return window.__closes;",
        |v| v.get("client").is_some() && v.get("server").is_some(),
    )
    .await;
    assert_eq!(closes["client"]["code"], 1000, "{closes}");
    assert_eq!(closes["client"]["clean"], true, "{closes}");
    assert_eq!(closes["server"]["code"], 1003, "{closes}");
    assert_eq!(closes["server"]["clean"], true, "{closes}");
    assert!(
        closes["server"]["reason"]
            .as_str()
            .unwrap()
            .contains("binary frames"),
        "{closes}"
    );
    ctx.finish(server).await;
}

/// A browser's `EventSource` on a task's events opens once, gets the result, and ends
/// CLOSED: its reconnect after the stream ends is answered 204, so it does not come back
/// every 2 s. The same on a task that had already finished when it was opened.
async fn task_eventsource_stops_after_the_result_scene(ctx: Arc<Ctx>) {
    let (_mock, server) = env(
        MockConfig {
            // Long enough to still run when the page opens its EventSource.
            tokens: 40,
            token_delay: Duration::from_millis(50),
            ..Default::default()
        },
        |c| c.chat.auth = AuthMode::Off,
    )
    .await;
    let r = client()
        .post(format!("{}/api/tasks?sync=false", server.url))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let c = ctx.browser().await;
    c.goto(&server.url).await.unwrap();
    wait_css(&c, "#shell:not([hidden])").await;
    let follow = format!(
        "window.__es = {{opens: 0, events: []}};
         const es = new EventSource('/api/tasks/{id}/events');
         window.__source = es;
         es.onopen = () => window.__es.opens++;
         for (const k of ['queued', 'running', 'progress', 'succeeded', 'failed'])
           es.addEventListener(k, () => window.__es.events.push(k));"
    );
    let state = "return {...window.__es, readyState: window.__source.readyState};";
    // While the task runs, then once more after it has finished.
    for round in ["running", "finished"] {
        js(&c, &follow).await;
        let seen = wait_js(&c, "the EventSource to close", state, |v| {
            v["readyState"] == 2
        })
        .await;
        assert_eq!(seen["opens"], 1, "{round}: {seen}");
        assert_eq!(
            seen["events"].as_array().unwrap().last(),
            Some(&json!("succeeded")),
            "{round}: {seen}"
        );
    }
    ctx.finish(server).await;
}

/// An admin key sees health, readiness, metrics, streams and the cache; a user key is
/// refused in plain words and has no Admin tab.
async fn admin_view_for_admin_keys_only_scene(ctx: Arc<Ctx>) {
    let (_mock, server) = env(
        MockConfig {
            tokens: 400,
            token_delay: Duration::from_millis(20),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let admin = api_key(&server, "ops", true).await;
    let user = api_key(&server, "frank", false).await;
    let (a, u) = tokio::join!(ctx.browser(), ctx.browser());
    tokio::join!(
        sign_in(&a, &server.url, &admin),
        sign_in(&u, &server.url, &user)
    );
    // A reply streaming, for the admin to see.
    type_into(&u, "#input", &format!("Keep talking{ENTER}")).await;
    wait_reply_longer_than(&u, 10).await;
    let streaming = session_id(&u).await;

    click(&a, "#nav-admin").await;
    wait_js(
        &a,
        "health and readiness",
        "return [document.querySelector('#admin-health .badge')?.textContent,
                 document.querySelector('#admin-ready .badge')?.textContent];",
        |v| v == &json!(["ok", "ready"]),
    )
    .await;
    // Metrics and streams: figures, or a plain note where the server lacks the endpoint.
    let streams = wait_js(
        &a,
        "the metrics and the running stream",
        "return document.querySelector('#admin-metrics .tile, #admin-metrics .unavailable')
             ? document.querySelector('#admin-streams tbody, #admin-streams .unavailable')?.textContent
             : null;",
        |v| v.is_string(),
    )
    .await;
    let streams = streams.as_str().unwrap();
    assert!(
        streams.contains("does not provide") || streams.contains(&streaming[..8]),
        "the running reply is listed: {streams}"
    );
    screenshot(&a, "admin").await;
    click(&a, "#cache-clear").await;
    wait_js(
        &a,
        "the cache clear outcome",
        "return document.querySelector('#admin-cache [role=status]').textContent;",
        |v| {
            v.as_str()
                .is_some_and(|t| t.starts_with("Cleared") || t.contains("no cache"))
        },
    )
    .await;

    assert!(
        !u.find(Locator::Css("#nav-admin"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "no Admin tab for a user key"
    );
    u.goto(&format!("{}/#/admin", server.url)).await.unwrap();
    let refused = wait_css(&u, "#admin-refused").await;
    assert!(
        refused.text().await.unwrap().contains("needs an admin key"),
        "the admin view is refused in plain words"
    );
    let stopped = client()
        .post(format!("{}/api/sessions/{streaming}/cancel", server.url))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200);
    ctx.finish(server).await;
}

/// At 390 px wide the sidebar becomes a drawer behind a menu button and nothing overflows.
async fn phone_width_layout_scene(ctx: Arc<Ctx>) {
    let n = 24;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            token_delay: Duration::from_millis(5),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let key = api_key(&server, "gina", false).await;
    let c = ctx.sized_browser(390, 844).await;
    sign_in(&c, &server.url, &key).await;
    let width = js(&c, "return window.innerWidth;").await;
    assert!(
        width.as_u64().unwrap() <= 400,
        "the window is phone-sized: {width}"
    );
    type_into(&c, "#input", &format!("Hi from a phone{ENTER}")).await;
    wait_js(&c, "the reply", LAST_REPLY_JS, |v| {
        v["status"] == "complete"
    })
    .await;
    let layout = js(
        &c,
        "return {overflow: document.documentElement.scrollWidth > window.innerWidth,
                 sidebarRight: document.querySelector('#sidebar').getBoundingClientRect().right,
                 composerRight: document.querySelector('#composer').getBoundingClientRect().right};",
    )
    .await;
    assert_eq!(
        layout["overflow"], false,
        "no horizontal scrolling: {layout}"
    );
    assert!(layout["sidebarRight"].as_f64().unwrap() <= 0.0, "{layout}");
    assert!(
        layout["composerRight"].as_f64().unwrap() <= width.as_f64().unwrap(),
        "{layout}"
    );
    screenshot(&c, "phone-chat").await;
    click(&c, "#menu").await;
    wait_js(
        &c,
        "the drawer open",
        "return document.querySelector('#sidebar').getBoundingClientRect().left;",
        |v| v.as_f64().is_some_and(|x| x >= 0.0),
    )
    .await;
    screenshot(&c, "phone-menu").await;
    c.active_element()
        .await
        .unwrap()
        .send_keys(ESCAPE)
        .await
        .unwrap();
    wait_js(
        &c,
        "Esc to close the drawer",
        "return document.querySelector('#sidebar').getBoundingClientRect().right;",
        |v| v.as_f64().is_some_and(|x| x <= 0.0),
    )
    .await;
    ctx.finish(server).await;
}

/// An upstream failure shows in plain words with a Retry button, and the retry succeeds.
async fn upstream_failure_shows_plain_words_and_retries_scene(ctx: Arc<Ctx>) {
    let n = 12;
    let (_mock, server) = env(
        MockConfig {
            tokens: n,
            fault: Some(Fault::ServerError),
            fail_times: Some(1),
            ..Default::default()
        },
        |c| c.upstream.retry.max_attempts = 1,
    )
    .await;
    let key = api_key(&server, "hal", false).await;
    let c = ctx.browser().await;
    sign_in(&c, &server.url, &key).await;
    type_into(&c, "#input", &format!("Hello{ENTER}")).await;
    let failed = wait_js(&c, "the failed reply", LAST_REPLY_JS, |v| {
        v["status"] == "failed"
    })
    .await;
    let words = failed["error"].as_str().unwrap();
    assert!(
        words.contains("model provider"),
        "the failure is in plain words: {words}"
    );
    screenshot(&c, "error-retry").await;
    click(&c, "#messages .msg-error .retry").await;
    wait_js(&c, "the retried reply", LAST_REPLY_JS, |v| {
        v["status"] == "complete"
    })
    .await;
    let replies = js(
        &c,
        "return [...document.querySelectorAll('#messages .msg.assistant')].map(m => m.dataset.status);",
    )
    .await;
    assert_eq!(replies, json!(["failed", "complete"]));
    let last = js(&c, LAST_REPLY_JS).await;
    assert_eq!(
        last["text"].as_str().unwrap().trim_end(),
        full_reply(n).trim_end()
    );
    ctx.finish(server).await;
}

/// No configuration at all: the demo provider answers and the page opens without a key
/// (loopback). Its screenshot is the one in the README.
async fn demo_provider_out_of_the_box_scene(ctx: Arc<Ctx>) {
    let mut cfg = base_config();
    cfg.upstream.demo.first_token = Duration::from_millis(100);
    cfg.upstream.demo.between_tokens = Duration::from_millis(15);
    let server = TestServer::start(cfg).await;
    for title in ["Rust lifetimes, explained", "Trip to Lisbon"] {
        let r = client()
            .post(format!("{}/api/sessions", server.url))
            .json(&json!({ "title": title }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let c = ctx.browser().await;
    c.goto(&format!("{}/", server.url)).await.unwrap();
    wait_css(&c, "#shell:not([hidden]) #chat-empty:not([hidden])").await;
    for (i, question) in [
        "What can sluice do for my chat app?",
        "And how do I connect a real model?",
    ]
    .into_iter()
    .enumerate()
    {
        type_into(&c, "#input", &format!("{question}{ENTER}")).await;
        let done = wait_js(&c, "the demo reply", LAST_REPLY_JS, |v| {
            v["status"] == "complete" && v["text"].as_str().is_some_and(|t| t.contains(question))
        })
        .await;
        assert!(
            done["text"]
                .as_str()
                .unwrap()
                .starts_with("Hello from sluice's built-in demo model."),
            "reply {i}: {done}"
        );
    }
    wait_js(
        &c,
        "three chats in the sidebar, newest first",
        "return [...document.querySelectorAll('#sessions .session-title')].map(e => e.textContent);",
        |v| {
            v == &json!([
                "What can sluice do for my chat app?",
                "Trip to Lisbon",
                "Rust lifetimes, explained"
            ])
        },
    )
    .await;
    screenshot(&c, "demo-chat").await;
    ctx.finish(server).await;
}

/// The model picker lists `/v1/models`, starts at the default model (the upstream's own
/// first model, as nothing is configured), and a pick answers the chat's replies and is
/// remembered for that chat only, across a reload.
async fn model_picker_picks_the_replying_model_per_chat_scene(ctx: Arc<Ctx>) {
    let mock = mock(MockConfig {
        tokens: 5,
        ..Default::default()
    })
    .await;
    let mut cfg = config_for(&mock);
    cfg.upstream.demo.first_token = Duration::from_millis(1);
    cfg.upstream.demo.between_tokens = Duration::from_millis(1);
    let server = TestServer::start(cfg).await;
    let c = ctx.browser().await;
    c.goto(&format!("{}/", server.url)).await.unwrap();
    wait_css(&c, "#shell:not([hidden]) #chat-empty:not([hidden])").await;
    let picker = "const s = document.querySelector('#model');
                  return {value: s.value, options: [...s.options].map(o => o.value)};";
    wait_js(&c, "the picker at the default model", picker, |v| {
        v["value"] == "mock"
            && v["options"]
                .as_array()
                .is_some_and(|o| o.contains(&json!("demo")) && o.contains(&json!("mock")))
    })
    .await;
    act(
        &c,
        "#model",
        |e| async move { e.select_by_value("demo").await },
    )
    .await;
    type_into(&c, "#input", &format!("Who answers?{ENTER}")).await;
    let reply = |model: &'static str, n: usize| {
        move |v: &Value| {
            v["status"] == "complete"
                && v["meta"].as_str().is_some_and(|m| m.contains(model))
                && v["count"] == n
        }
    };
    let last_reply_counted = concat!(
        last_reply!(),
        "reply.count = document.querySelectorAll('#messages .msg.assistant').length; return reply;"
    );
    let done = wait_js(&c, "the demo's reply", last_reply_counted, reply("demo", 1)).await;
    assert!(
        done["text"]
            .as_str()
            .unwrap()
            .starts_with("Hello from sluice's built-in demo model."),
        "{done}"
    );
    let picked = session_id(&c).await;
    c.refresh().await.unwrap();
    wait_js(&c, "the pick kept across a reload", picker, |v| {
        v["value"] == "demo"
    })
    .await;
    type_into(&c, "#input", &format!("Still you?{ENTER}")).await;
    wait_js(&c, "the demo again", last_reply_counted, reply("demo", 2)).await;

    c.goto(&format!("{}/#/new", server.url)).await.unwrap();
    wait_css(&c, "#chat-empty:not([hidden])").await;
    wait_js(&c, "a new chat at the default model", picker, |v| {
        v["value"] == "mock"
    })
    .await;
    type_into(&c, "#input", &format!("And now?{ENTER}")).await;
    let done = wait_js(
        &c,
        "the upstream's reply",
        last_reply_counted,
        reply("mock", 1),
    )
    .await;
    assert_eq!(
        done["text"].as_str().unwrap().trim_end(),
        full_reply(5).trim_end()
    );
    c.goto(&format!("{}/#/chat/{picked}", server.url))
        .await
        .unwrap();
    wait_js(&c, "the first chat still on its pick", picker, |v| {
        v["value"] == "demo"
    })
    .await;
    ctx.finish(server).await;
}

/// A reasoning model's thinking shows above its answer in a collapsed "Reasoning" box: live
/// while it thinks, and from the history after a reload. Opening it shows the thinking.
async fn reasoning_shows_collapsed_above_the_answer_scene(ctx: Arc<Ctx>) {
    let upstream = reasoning_upstream(Duration::from_millis(400)).await;
    let (_mock, server) = env(MockConfig::default(), |c| {
        c.upstream.providers = vec![ProviderConfig::openai("reasoner", &upstream, None)];
    })
    .await;
    let key = api_key(&server, "judy", false).await;
    let c = ctx.browser().await;
    sign_in(&c, &server.url, &key).await;
    let script = concat!(
        last_reply!(),
        "const d = m?.querySelector('details.reasoning');
         const b = d?.querySelector('.reasoning-body');
         const answer = m?.querySelector('.body');
         return {...reply,
           shown: d ? !d.hidden : false,
           open: d ? d.open : null,
           summary: d?.querySelector('summary').textContent ?? null,
           reasoning: b?.textContent ?? null,
           rendered: b ? b.checkVisibility() : null,
           above: d && !d.hidden
             ? d.getBoundingClientRect().bottom <= answer.getBoundingClientRect().top : null};"
    );
    type_into(&c, "#input", &format!("What is the answer?{ENTER}")).await;
    let thinking_live = wait_js(&c, "the thinking, live and collapsed", script, |v| {
        v["status"] == "streaming" && v["shown"] == true && v["text"] == ""
    })
    .await;
    let so_far = thinking_live["reasoning"].as_str().unwrap();
    assert!(
        !so_far.is_empty() && thinking().starts_with(so_far),
        "{thinking_live}"
    );
    assert_eq!(thinking_live["open"], false, "collapsed: {thinking_live}");
    assert_eq!(
        thinking_live["rendered"], false,
        "collapsed: {thinking_live}"
    );
    assert_eq!(thinking_live["summary"], "Reasoning");
    assert_eq!(thinking_live["above"], true, "{thinking_live}");

    let done = wait_js(&c, "the answer", script, |v| v["status"] == "complete").await;
    assert_eq!(done["text"].as_str().unwrap().trim_end(), answer());
    assert_eq!(done["reasoning"], thinking());
    assert_eq!(
        (&done["shown"], &done["open"]),
        (&json!(true), &json!(false)),
        "{done}"
    );
    click(&c, "#messages .msg.assistant details.reasoning summary").await;
    let opened = wait_js(&c, "the thinking opened", script, |v| v["open"] == true).await;
    assert_eq!(opened["rendered"], true, "{opened}");
    screenshot(&c, "reasoning").await;

    // From the stored history: collapsed again, the same thinking, the same answer.
    c.refresh().await.unwrap();
    let stored = wait_js(&c, "the stored reply with its thinking", script, |v| {
        v["status"] == "complete" && v["shown"] == true
    })
    .await;
    assert_eq!(stored["reasoning"], thinking());
    assert_eq!(stored["text"].as_str().unwrap().trim_end(), answer());
    assert_eq!(
        (&stored["open"], &stored["rendered"], &stored["above"]),
        (&json!(false), &json!(false), &json!(true)),
        "{stored}"
    );
    ctx.finish(server).await;
}

// ---------------------------------------------------------------------------------------
// Harness: chromedriver, servers, and the UI's moves
// ---------------------------------------------------------------------------------------

/// The chromedriver all scenarios share.
struct Driver {
    url: String,
    /// Its stdin is the process's end of the pipe: when the test process exits, the
    /// shell reads end of file and ends its process group, chromedriver and browsers.
    _watch: std::process::Child,
}

impl Driver {
    /// Started by the first scenario; the later ones wait for it.
    async fn shared() -> &'static Driver {
        static DRIVER: tokio::sync::OnceCell<Driver> = tokio::sync::OnceCell::const_new();
        DRIVER.get_or_init(Self::start).await
    }

    async fn start() -> Self {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let watch = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{CHROMEDRIVER} --port={port} >/dev/null 2>&1 & read -r _; kill 0"
            ))
            .stdin(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + UI_WAIT;
        loop {
            let up = client().get(format!("{url}/status")).send().await;
            if up.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver never answered on {url}"
            );
            tokio::time::sleep(POLL).await;
        }
        Self { url, _watch: watch }
    }

    async fn browser(&self, width: u32, height: u32) -> Client {
        let mut options = json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                format!("--window-size={width},{height}"),
            ],
        });
        // Chromium will not make a window narrower than 500 px; a phone's viewport comes
        // from device emulation instead.
        if width < 500 {
            options["mobileEmulation"] = json!({
                "deviceMetrics": {"width": width, "height": height, "pixelRatio": 2}
            });
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        // chromedriver listens on plain HTTP on loopback: no TLS.
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session starts")
    }
}

struct Ctx {
    driver: &'static Driver,
    /// Every browser a scenario opened, closed by the runner whatever happened.
    browsers: Mutex<Vec<Client>>,
}

impl Ctx {
    /// Closes the browsers first: their open streams would otherwise hold the server's
    /// graceful shutdown for its whole drain window.
    async fn finish(&self, server: TestServer) {
        let browsers = std::mem::take(&mut *self.browsers.lock().unwrap());
        for b in browsers {
            let _ = tokio::time::timeout(CLEANUP, b.close()).await;
        }
        server.shutdown().await;
    }

    async fn browser(&self) -> Client {
        self.sized_browser(1280, 900).await
    }

    async fn sized_browser(&self, width: u32, height: u32) -> Client {
        let c = self.driver.browser(width, height).await;
        self.browsers.lock().unwrap().push(c.clone());
        c
    }
}

fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots")
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots_dir().join(format!("{name}.png")), png).unwrap();
}

/// The mock upstream and the real server in front of it, keys required.
async fn env(
    mock_cfg: MockConfig,
    tweak: impl FnOnce(&mut Config) + Send,
) -> (MockServer, TestServer) {
    let e = TestEnv::builder()
        .mock(mock_cfg)
        .keys_required()
        .config(tweak)
        .start()
        .await;
    (e.mock, e.server)
}

async fn messages(server: &TestServer, key: &str, session: &str) -> Vec<Value> {
    let v: Value = client()
        .get(format!("{}/api/sessions/{session}/messages", server.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"].as_array().unwrap().clone()
}

/// A TCP proxy in front of the server whose open connections can all be cut at once: a
/// network drop, as the browser sees it. New connections go through as before.
struct CutProxy {
    url: String,
    live: Arc<Mutex<CancellationToken>>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
}

impl CutProxy {
    async fn start(target: &str) -> Self {
        let target = target.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let live = Arc::new(Mutex::new(CancellationToken::new()));
        let tokens = live.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let cut = tokens.lock().unwrap().clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self {
            url,
            live,
            cuts: Arc::default(),
        }
    }

    fn cut(&self) {
        let mut live = self.live.lock().unwrap();
        live.cancel();
        *live = CancellationToken::new();
        self.cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The reply a model "wrote" with markup in it, for the injection test.
const MARKUP_REPLY: &str = "Look: <script>window.__pwned = 1</script> and \
    <img src=x onerror=\"window.__pwned = 2\"> and [a link](javascript:window.__pwned=3) \
    and <b>not bold</b>.\n\n```html\n<script>alert(1)</script>\n```\n\n**done** `<i>code</i>`";

/// A tiny OpenAI-compatible upstream that streams [`MARKUP_REPLY`] in 4-character pieces,
/// so tags arrive split across tokens.
async fn markup_upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            let chunk = |delta: Value, finish: Value| {
                let c = json!({
                    "id": "chatcmpl-markup", "object": "chat.completion.chunk", "created": 0,
                    "model": "markup-model",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                });
                format!("data: {c}\n\n")
            };
            let chars: Vec<char> = MARKUP_REPLY.chars().collect();
            let mut body = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
            for piece in chars.chunks(4) {
                let text: String = piece.iter().collect();
                body += &chunk(json!({"content": text}), Value::Null);
            }
            body += &chunk(json!({}), json!("stop"));
            body += "data: [DONE]\n\n";
            ([("content-type", "text/event-stream")], body)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Evaluates `script` until `done` holds for its value, failing after [`UI_WAIT`].
async fn wait_js(c: &Client, what: &str, script: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + UI_WAIT;
    loop {
        let v = js(c, script).await;
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last seen: {v}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_css(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(UI_WAIT)
        .every(POLL)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} never appeared: {e}"))
}

/// Finds `css` and acts on it; if the page re-rendered it in between (a stale element),
/// finds it again, as a user's second look would.
async fn act<F, Fut>(c: &Client, css: &str, what: F)
where
    F: Fn(fantoccini::elements::Element) -> Fut,
    Fut: Future<Output = Result<(), fantoccini::error::CmdError>>,
{
    let deadline = Instant::now() + UI_WAIT;
    loop {
        match what(wait_css(c, css).await).await {
            Ok(()) => return,
            Err(fantoccini::error::CmdError::Standard(e))
                if e.error == fantoccini::error::ErrorStatus::StaleElementReference
                    && Instant::now() < deadline => {}
            Err(e) => panic!("{css}: {e}"),
        }
    }
}

async fn click(c: &Client, css: &str) {
    act(c, css, |e| async move { e.click().await }).await;
}

async fn type_into(c: &Client, css: &str, keys: &str) {
    act(c, css, |e| async move { e.send_keys(keys).await }).await;
}

async fn texts(c: &Client, css: &str) -> Vec<String> {
    let v = js(
        c,
        &format!("return [...document.querySelectorAll({css:?})].map(e => e.textContent);"),
    )
    .await;
    serde_json::from_value(v).unwrap()
}

async fn sign_in(c: &Client, base: &str, key: &str) {
    c.goto(&format!("{base}/")).await.unwrap();
    type_into(c, "#signin:not([hidden]) #signin-key", key).await;
    click(c, "#signin-submit").await;
    wait_css(c, "#shell:not([hidden])").await;
}

async fn session_id(c: &Client) -> String {
    let hash = wait_js(c, "a chat in the address", "return location.hash;", |v| {
        v.as_str().is_some_and(|h| h.starts_with("#/chat/"))
    })
    .await;
    hash.as_str().unwrap()["#/chat/".len()..].to_owned()
}

async fn wait_reply_longer_than(c: &Client, chars: usize) {
    wait_js(c, "part of the reply", LAST_REPLY_JS, |v| {
        v["status"] == "streaming" && v["text"].as_str().is_some_and(|t| t.len() > chars)
    })
    .await;
}

/// Watches the last reply until it completes, as fast as the browser answers (to catch the
/// intermediate states), checking that every state is a prefix of the full reply: no gap,
/// no repeated word, nothing the model did not send. Returns the distinct states.
async fn watch_reply(c: &Client, full: &str) -> Vec<String> {
    watch(c, full, LAST_REPLY_JS).await
}

/// Like [`watch_reply`] for the second reply of the conversation.
async fn watch_second_reply(c: &Client, full: &str) -> Vec<String> {
    let script = LAST_REPLY_JS.replace(
        "[...document.querySelectorAll('#messages .msg.assistant')].pop()",
        "document.querySelectorAll('#messages .msg.assistant')[1]",
    );
    assert_ne!(
        script, LAST_REPLY_JS,
        "the selector to replace is in the script"
    );
    watch(c, full, &script).await
}

async fn watch(c: &Client, full: &str, script: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + UI_WAIT;
    loop {
        let v = js(c, script).await;
        if let Some(text) = v["text"].as_str() {
            assert!(
                full.starts_with(text),
                "the page shows text that is not a prefix of the reply: {text:?}"
            );
            let before = seen.last().map_or(0, String::len);
            assert!(
                text.len() >= before,
                "the reply went back from {before} to {} characters: it restarted instead of resuming",
                text.len()
            );
            if seen.last().map(String::as_str) != Some(text) {
                seen.push(text.to_owned());
            }
            if v["status"] == "complete" {
                return seen;
            }
            assert!(
                v["status"] == "streaming",
                "the reply ended as {}: {v}",
                v["status"]
            );
        }
        assert!(
            Instant::now() < deadline,
            "the reply never completed; states seen: {seen:?}"
        );
    }
}

/// A reply nested 10,000 quotes deep shows, its nesting bounded and the rest as text, and
/// the reply after it renders too: no message can stop the conversation from painting.
async fn deep_nesting_renders_and_the_next_reply_too_scene(ctx: Arc<Ctx>) {
    let upstream = scripted_upstream(|prompt| {
        if prompt.contains("deep") {
            format!("{} bottom", ">".repeat(10_000))
        } else {
            "After the **deep** one.".into()
        }
    })
    .await;
    let mut cfg = base_config();
    cfg.upstream.providers = vec![ProviderConfig::openai("scripted", &upstream, None)];
    cfg.chat.auth = AuthMode::Required;
    cfg.chat.default_model = "scripted-model".into();
    let server = TestServer::start(cfg).await;
    let key = api_key(&server, "frank", false).await;
    let c = ctx.browser().await;
    sign_in(&c, &server.url, &key).await;
    type_into(&c, "#input", &format!("Go deep{ENTER}")).await;
    let deep = wait_js(
        &c,
        "the deep reply, rendered",
        concat!(
            last_reply!(),
            "let depth = 0;
             for (let e = m?.querySelector('.body'); (e = e?.querySelector(':scope > blockquote')); ) depth++;
             return {...reply, depth};"
        ),
        |v| v["status"] == "complete" && v["text"].as_str().is_some_and(|t| t.contains("bottom")),
    )
    .await;
    let depth = deep["depth"].as_u64().unwrap();
    assert!(
        (1..=32).contains(&depth),
        "quotes nest {depth} deep, the rest shows as text"
    );

    type_into(&c, "#input", &format!("And now?{ENTER}")).await;
    wait_js(
        &c,
        "the next reply, rendered",
        "const all = document.querySelectorAll('#messages .msg.assistant');
         const m = all[1];
         return [all.length, m?.dataset.status, m?.querySelector('.body strong')?.textContent];",
        |v| v == &json!([2, "complete", "deep"]),
    )
    .await;
    ctx.finish(server).await;
}

/// A tiny OpenAI-compatible upstream that streams `reply(last message)` in pieces.
async fn scripted_upstream(reply: fn(&str) -> String) -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |axum::Json(req): axum::Json<Value>| async move {
            let last = req["messages"]
                .as_array()
                .and_then(|m| m.last())
                .map(Value::to_string)
                .unwrap_or_default();
            let chunk = |delta: Value, finish: Value| {
                let c = json!({
                    "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0,
                    "model": "scripted-model",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                });
                format!("data: {c}\n\n")
            };
            let chars: Vec<char> = reply(&last).chars().collect();
            let mut body = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
            for piece in chars.chunks(500) {
                let text: String = piece.iter().collect();
                body += &chunk(json!({"content": text}), Value::Null);
            }
            body += &chunk(json!({}), json!("stop"));
            body += "data: [DONE]\n\n";
            ([("content-type", "text/event-stream")], body)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}
