#![allow(clippy::unwrap_used)] // tests fail loudly by design

//! The shipped documentation matches the code: `.env.example` names every variable sluice
//! reads, in the sections `sluice serve --help` groups them in.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(std::fs::read_to_string(&p).unwrap());
        }
    }
}

#[test]
fn env_example_lists_every_variable() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    let mut sources = Vec::new();
    rust_files(&root.join("src"), &mut sources);
    let mut missing = Vec::new();
    for src in &sources {
        for part in src.split("env = \"").skip(1) {
            let var = part.split('"').next().unwrap();
            if !example.contains(&format!("{var}=")) {
                missing.push(var.to_owned());
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), ".env.example lacks: {missing:?}");
}

/// The markdown files a reader lands on: the README and every page under docs/.
fn markdown_pages(root: &Path) -> Vec<std::path::PathBuf> {
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "md") {
            pages.push(entry.path());
        }
    }
    pages.sort();
    pages
}

/// Text outside fenced code blocks, where a `](…)` is a link and not an example.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, and a
/// `-N` suffix for a repeated heading.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut count: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in prose(text).lines() {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = count.entry(slug.clone()).or_default();
        *n += 1;
        let n = *n - 1;
        seen.push(if n == 0 { slug } else { format!("{slug}-{n}") });
    }
    seen
}

/// Every `[text](target)` of a page whose target is inside the repository.
fn relative_links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut links = Vec::new();
    for part in prose.split("](").skip(1) {
        let Some(end) = part.find(')') else { continue };
        let target = part[..end].trim();
        if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        links.push(target.to_owned());
    }
    links
}

#[test]
fn relative_links_point_at_existing_files_and_headings() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    for page in markdown_pages(root) {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(root).unwrap().display().to_string();
        for link in relative_links(&text) {
            let (file, anchor) = match link.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !target.exists() {
                broken.push(format!("{name}: {link} (no such file)"));
                continue;
            }
            if let Some(anchor) = anchor.filter(|_| target.extension().is_some_and(|e| e == "md")) {
                let heads = anchors(&std::fs::read_to_string(&target).unwrap());
                if !heads.iter().any(|h| h == anchor) {
                    broken.push(format!("{name}: {link} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn readme_stays_a_short_first_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lines = std::fs::read_to_string(root.join("README.md"))
        .unwrap()
        .lines()
        .count();
    assert!(
        lines < 250,
        "README.md has {lines} lines; move depth into docs/"
    );
}

/// `.env.example` is laid out like `sluice serve --help`: each variable sits under the
/// section named as its flag's heading.
#[test]
fn env_example_sections_are_the_help_headings() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();

    // Heading of each variable in the help: headings are unindented lines ending in ':'.
    let mut heading = String::new();
    let mut in_help = Vec::new();
    for line in help.lines() {
        if let Some(h) = line.strip_suffix(':').filter(|_| !line.starts_with(' ')) {
            heading = h.to_owned();
        } else if let Some(rest) = line.trim().strip_prefix("[env: ") {
            let var = rest.split(['=', ']']).next().unwrap().to_owned();
            in_help.push((var, heading.clone()));
        }
    }
    assert!(in_help.len() >= 70, "{help}");

    let mut section = String::new();
    let mut wrong = Vec::new();
    for (var, heading) in &in_help {
        let mut found = None;
        for line in example.lines() {
            if let Some(title) = line.strip_prefix("# --- ") {
                section = title.trim_end_matches(['-', ' ']).to_owned();
            } else if line
                .trim_start_matches(['#', ' '])
                .starts_with(&format!("{var}="))
            {
                found = Some(section.clone());
                break;
            }
        }
        if found.as_deref() != Some(heading.as_str()) {
            wrong.push(format!("{var}: help {heading:?}, .env.example {found:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
