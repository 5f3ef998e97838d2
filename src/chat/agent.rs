//! Agents (named model configurations), scene templates, and turning a conversation into
//! the request an agent sends upstream.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::domain::{ChatRequest, GenParams, Message, Role};
use crate::store::{Agent, KnowledgeHit, Store, StoreError, new_id, now_millis};

/// The agent of sessions and tasks that name none; created at start if missing.
pub const DEFAULT_AGENT: &str = "default";

/// How many knowledge-base hits a `knowledge: true` agent gets in its system prompt.
const KNOWLEDGE_HITS: u32 = 3;

/// The default agent follows `SLUICE_DEFAULT_MODEL`: its model is set at every start.
pub async fn ensure_default_agent(store: &dyn Store, model: &str) -> Result<(), StoreError> {
    if let Some(mut a) = store.get_agent(DEFAULT_AGENT).await? {
        if a.model != model {
            a.model = model.to_owned();
            a.updated_at = now_millis();
            store.update_agent(&a).await?;
        }
        return Ok(());
    }
    let now = now_millis();
    let agent = Agent {
        id: new_id(),
        name: DEFAULT_AGENT.into(),
        provider: None,
        model: model.to_owned(),
        system_prompt: None,
        temperature: None,
        max_tokens: None,
        fallback_models: Vec::new(),
        knowledge: false,
        is_active: true,
        created_at: now,
        updated_at: now,
    };
    match store.create_agent(&agent).await {
        // Another instance created it first.
        Ok(()) | Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The placeholders of a template, `{{ name }}` (spaces inside the braces allowed).
pub fn placeholders(template: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let name = after[..end].trim();
        if !name.is_empty() {
            out.insert(name.to_owned());
        }
        rest = &after[end + 2..];
    }
    out
}

/// Fills a template. Every placeholder needs a variable and every variable a placeholder;
/// the error names the first that does not.
pub fn render(template: &str, vars: &Map<String, Value>) -> Result<String, String> {
    let names = placeholders(template);
    if let Some(missing) = names.iter().find(|n| !vars.contains_key(*n)) {
        return Err(format!(
            "variables.{missing}: missing (the scene uses {{{{{missing}}}}})"
        ));
    }
    if let Some(extra) = vars.keys().find(|k| !names.contains(*k)) {
        return Err(format!("variables.{extra}: not used by the scene"));
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push_str(&rest[..start]);
        let name = after[..end].trim();
        match vars.get(name) {
            Some(Value::String(s)) => out.push_str(s),
            Some(other) => out.push_str(&other.to_string()),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The upstream request of `agent` for `messages`: its system prompt (with knowledge-base
/// hits for the last user message when the agent asks for them) and its parameters.
pub async fn build_request(
    store: &dyn Store,
    agent: &Agent,
    messages: Vec<Message>,
) -> Result<ChatRequest, StoreError> {
    let mut system = agent.system_prompt.clone().unwrap_or_default();
    if agent.knowledge {
        let query = messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.text())
            .unwrap_or_default();
        if !query.trim().is_empty() {
            let hits = store.search_knowledge(&query, KNOWLEDGE_HITS).await?;
            append_knowledge(&mut system, &hits);
        }
    }
    let mut all = Vec::with_capacity(messages.len() + 1);
    if !system.is_empty() {
        all.push(Message::new(Role::System, system));
    }
    all.extend(messages);
    Ok(ChatRequest {
        model: agent.model.clone(),
        messages: all,
        params: GenParams {
            temperature: agent.temperature,
            max_tokens: agent.max_tokens.and_then(|t| u32::try_from(t).ok()),
            ..Default::default()
        },
        extra: Default::default(),
    })
}

fn append_knowledge(system: &mut String, hits: &[KnowledgeHit]) {
    if hits.is_empty() {
        return;
    }
    if !system.is_empty() {
        system.push_str("\n\n");
    }
    system.push_str("Use this knowledge where it helps:\n");
    for h in hits {
        system.push_str(&format!("- {}: {}\n", h.title, h.snippet));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn templates_render_and_name_bad_variables() {
        let t = "Summarise {{ topic }} for {{audience}} in {{n}} words. {{topic}}!";
        assert_eq!(
            placeholders(t).into_iter().collect::<Vec<_>>(),
            ["audience", "n", "topic"]
        );
        let out = render(
            t,
            &vars(json!({"topic": "tides", "audience": "kids", "n": 50})),
        )
        .unwrap();
        assert_eq!(out, "Summarise tides for kids in 50 words. tides!");
        let e = render(t, &vars(json!({"topic": "x", "n": 1}))).unwrap_err();
        assert!(e.starts_with("variables.audience: missing"), "{e}");
        let e = render(
            t,
            &vars(json!({"topic": "x", "audience": "y", "n": 1, "tone": "dry"})),
        )
        .unwrap_err();
        assert!(e.starts_with("variables.tone: not used"), "{e}");
        // Braces in values are not templates.
        assert_eq!(
            render("{{a}}", &vars(json!({"a": "{{b}}"}))).unwrap(),
            "{{b}}"
        );
    }
}
