//! `sluice migrate` and `sluice keys …`.
//!
//! Output contract, for scripts: `keys create` prints the key alone on one stdout line and
//! everything else on stderr; no command ever prints a key except that one time.

use crate::config::StoreConfig;

use super::{ApiKey, Millis, Store, StoreError, User, now_millis};

/// Every key starts with this, so leaked keys are easy to recognise and scan for.
pub const KEY_PREFIX: &str = "sk-sluice-";
/// 40 alphanumerics: about 238 bits of entropy.
const KEY_RANDOM_CHARS: usize = 40;
/// `sk-sluice-` and four random characters: enough to tell a user's keys apart, far too
/// few to help guess one.
const SHOWN_PREFIX_CHARS: usize = 14;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Creates a key and prints it once; only its SHA-256 is stored.
    Create {
        /// The user the key acts as (created if missing); also the key's name.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        name: String,
        #[arg(long)]
        admin: bool,
    },
    /// Lists keys (never the keys themselves).
    List,
    /// Revokes a key by id or name; it stops working at once.
    Revoke { id_or_name: String },
}

/// Opens the store, which applies any pending migration, and says what happened.
// A command-line command: what it prints is its result.
#[allow(clippy::print_stdout)]
pub async fn migrate(cfg: &StoreConfig) -> Result<(), StoreError> {
    let (target, applied) = match &cfg.database_url {
        Some(url) => {
            let store = super::postgres::PgStore::connect(url.expose(), cfg).await?;
            // Not the URL: it may hold a password.
            (
                "PostgreSQL (DATABASE_URL)".to_owned(),
                store.applied_migrations().to_vec(),
            )
        }
        None => {
            let store = super::sqlite::SqliteStore::open(cfg).await?;
            (
                format!("SQLite ({})", store.path().display()),
                store.applied_migrations().to_vec(),
            )
        }
    };
    if applied.is_empty() {
        println!("{target}: schema is up to date, no migration applied");
    } else {
        println!(
            "{target}: applied {} migration(s): {}",
            applied.len(),
            applied.join(", ")
        );
    }
    Ok(())
}

// A command-line command: the key, the table or the count printed is its result.
#[allow(clippy::print_stdout)]
pub async fn keys(cfg: &StoreConfig, cmd: KeysCommand) -> Result<(), StoreError> {
    let store = super::open(cfg).await?;
    match cmd {
        KeysCommand::Create { name, admin } => {
            let key = create_key(store.as_ref(), &name, admin).await?;
            println!("{}", key.secret);
            eprintln!(
                "Created {}key {} ({}…) for user '{name}'. Store it now: it will not be shown again.",
                if admin { "admin " } else { "" },
                key.record.id,
                key.record.prefix,
            );
        }
        KeysCommand::List => {
            let keys = store.list_api_keys().await?;
            print!("{}", key_table(&keys));
        }
        KeysCommand::Revoke { id_or_name } => {
            let n = store.revoke_api_key(&id_or_name, now_millis()).await?;
            if n == 0 {
                return Err(StoreError::NotFound(
                    format!("no active key with id or name '{id_or_name}'").into(),
                ));
            }
            println!("revoked {n} key{}", if n == 1 { "" } else { "s" });
        }
    }
    Ok(())
}

/// A key just created: the secret exists only in this value.
pub struct NewKey {
    pub secret: String,
    pub record: ApiKey,
}

/// Ensures the user `name`, then creates a key named `name` for it.
pub async fn create_key(store: &dyn Store, name: &str, admin: bool) -> Result<NewKey, StoreError> {
    let now = now_millis();
    let user = store.ensure_user(&User::new(name, now)).await?;
    let secret = generate_key();
    let record = ApiKey::new(&user.id, name, key_prefix(&secret), admin, now);
    store.create_api_key(&record, &hash_key(&secret)).await?;
    Ok(NewKey { secret, record })
}

/// A new random key: `sk-sluice-` and 40 alphanumerics from the thread-local CSPRNG.
pub fn generate_key() -> String {
    use rand::Rng;
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    key.push_str(KEY_PREFIX);
    key.extend(
        rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(KEY_RANDOM_CHARS)
            .map(char::from),
    );
    key
}

/// The part of a key that may be stored and shown.
pub fn key_prefix(key: &str) -> &str {
    key.char_indices()
        .nth(SHOWN_PREFIX_CHARS)
        .map_or(key, |(i, _)| &key[..i])
}

/// SHA-256 of a key: what the store keeps and looks keys up by.
pub fn hash_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

fn key_table(keys: &[ApiKey]) -> String {
    let header = ["ID", "NAME", "PREFIX", "ADMIN", "CREATED", "REVOKED"].map(String::from);
    let rows: Vec<[String; 6]> = keys
        .iter()
        .map(|k| {
            [
                k.id.clone(),
                k.name.clone(),
                k.prefix.clone(),
                if k.is_admin { "yes" } else { "no" }.to_owned(),
                format_millis(k.created_at),
                k.revoked_at.map_or_else(|| "-".to_owned(), format_millis),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no keys; create one with `sluice keys create --name NAME`)\n");
    }
    out
}

/// `YYYY-MM-DD HH:MM:SSZ` (UTC), without a date-time dependency.
fn format_millis(ms: Millis) -> String {
    let secs = ms.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_alphanumeric() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_PREFIX.len() + KEY_RANDOM_CHARS);
        assert!(a.starts_with(KEY_PREFIX));
        assert!(
            a[KEY_PREFIX.len()..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
        assert_eq!(key_prefix(&a).len(), SHOWN_PREFIX_CHARS);
        assert!(a.starts_with(key_prefix(&a)));
        assert_eq!(key_prefix("short"), "short");
    }

    #[test]
    fn hash_is_sha256() {
        assert_eq!(
            hex::encode(hash_key("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn formats_times_in_utc() {
        assert_eq!(format_millis(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_millis(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(format_millis(1_767_225_599_999), "2025-12-31 23:59:59Z");
    }

    #[test]
    fn table_has_every_key_and_aligned_columns() {
        let key = ApiKey {
            id: "0198abcd".into(),
            user_id: "u".into(),
            name: "alice".into(),
            prefix: "sk-sluice-AbCd".into(),
            is_admin: true,
            created_at: 0,
            revoked_at: None,
        };
        let t = key_table(&[key]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID        NAME"), "{t}");
        assert!(
            lines[1].contains("sk-sluice-AbCd  yes    1970-01-01 00:00:00Z  -"),
            "{t}"
        );
        assert!(key_table(&[]).contains("no keys"));
    }
}
