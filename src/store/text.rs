//! Text both backends can hold. PostgreSQL refuses NUL (U+0000) in any text value, SQLite
//! stores it; so that the two behave alike and a write never fails on it, every string that
//! reaches a store has each NUL replaced by U+FFFD. Client text with NUL is refused at the
//! HTTP edge (422); what is replaced here is text no one can be asked to resend, such as a
//! provider's reply.

use std::borrow::Cow;

use async_trait::async_trait;

use super::{
    Agent, ApiKey, CatalogStore, KeyStore, KnowledgeDoc, KnowledgeHit, MessageUpdate, Millis,
    PoolState, ResponseStore, Scene, Session, SessionCursor, SessionStore, StoreError, StoreHealth,
    StoredMessage, StoredResponse, Task, TaskStatus, TaskStore, UsageRecord, UsageRow, UsageStore,
    User,
};

/// `s` with each NUL replaced by U+FFFD; borrowed when there is none.
pub fn nul_free(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn owned(s: &str) -> String {
    nul_free(s).into_owned()
}

fn opt(s: &Option<String>) -> Option<String> {
    s.as_deref().map(owned)
}

fn opt_ref(s: Option<&str>) -> Option<Cow<'_, str>> {
    s.map(nul_free)
}

/// A store whose every string argument is made NUL-free first.
pub struct NulSafe<S>(pub S);

#[async_trait]
impl<S: StoreHealth> StoreHealth for NulSafe<S> {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().await
    }

    fn pool_state(&self) -> Option<PoolState> {
        self.0.pool_state()
    }
}

#[async_trait]
impl<S: KeyStore> KeyStore for NulSafe<S> {
    async fn ensure_user(&self, user: &User) -> Result<User, StoreError> {
        let user = User {
            id: owned(&user.id),
            name: owned(&user.name),
            created_at: user.created_at,
        };
        self.0.ensure_user(&user).await
    }

    async fn create_api_key(&self, key: &ApiKey, key_hash: &[u8; 32]) -> Result<(), StoreError> {
        let key = ApiKey {
            id: owned(&key.id),
            user_id: owned(&key.user_id),
            name: owned(&key.name),
            prefix: owned(&key.prefix),
            ..key.clone()
        };
        self.0.create_api_key(&key, key_hash).await
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.0.list_api_keys().await
    }

    async fn revoke_api_key(&self, id_or_name: &str, now: Millis) -> Result<u64, StoreError> {
        self.0.revoke_api_key(&nul_free(id_or_name), now).await
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        self.0.find_api_key(key_hash).await
    }

    async fn find_api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        self.0.find_api_key_by_id(&nul_free(id)).await
    }
}

#[async_trait]
impl<S: SessionStore> SessionStore for NulSafe<S> {
    async fn create_session(&self, s: &Session) -> Result<(), StoreError> {
        let s = Session {
            id: owned(&s.id),
            user_id: owned(&s.user_id),
            agent: opt(&s.agent),
            title: opt(&s.title),
            ..s.clone()
        };
        self.0.create_session(&s).await
    }

    async fn list_sessions(
        &self,
        user_id: &str,
        after: Option<&SessionCursor>,
        limit: u32,
    ) -> Result<Vec<Session>, StoreError> {
        let after = after.map(|c| SessionCursor {
            updated_at: c.updated_at,
            id: owned(&c.id),
        });
        self.0
            .list_sessions(&nul_free(user_id), after.as_ref(), limit)
            .await
    }

    async fn get_session(&self, user_id: &str, id: &str) -> Result<Option<Session>, StoreError> {
        self.0.get_session(&nul_free(user_id), &nul_free(id)).await
    }

    async fn delete_session(&self, user_id: &str, id: &str) -> Result<bool, StoreError> {
        self.0
            .delete_session(&nul_free(user_id), &nul_free(id))
            .await
    }

    async fn update_session_title(
        &self,
        user_id: &str,
        id: &str,
        title: Option<&str>,
    ) -> Result<Option<Session>, StoreError> {
        self.0
            .update_session_title(&nul_free(user_id), &nul_free(id), opt_ref(title).as_deref())
            .await
    }

    async fn list_messages(&self, session_id: &str) -> Result<Vec<StoredMessage>, StoreError> {
        self.0.list_messages(&nul_free(session_id)).await
    }

    async fn insert_message(&self, m: &StoredMessage) -> Result<(), StoreError> {
        let m = StoredMessage {
            id: owned(&m.id),
            session_id: owned(&m.session_id),
            role: m.role,
            content: owned(&m.content),
            reasoning: opt(&m.reasoning),
            status: m.status,
            generation_id: opt(&m.generation_id),
            model: opt(&m.model),
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
            error: opt(&m.error),
            created_at: m.created_at,
            updated_at: m.updated_at,
        };
        self.0.insert_message(&m).await
    }

    async fn update_message(
        &self,
        id: &str,
        u: &MessageUpdate,
        now: Millis,
    ) -> Result<(), StoreError> {
        let u = MessageUpdate {
            content: owned(&u.content),
            reasoning: opt(&u.reasoning),
            status: u.status,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            error: opt(&u.error),
        };
        self.0.update_message(&nul_free(id), &u, now).await
    }

    async fn interrupt_streaming(&self, now: Millis) -> Result<u64, StoreError> {
        self.0.interrupt_streaming(now).await
    }

    async fn claim_generation(
        &self,
        session_id: &str,
        generation_id: &str,
        server_id: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Option<String>, StoreError> {
        self.0
            .claim_generation(
                &nul_free(session_id),
                &nul_free(generation_id),
                &nul_free(server_id),
                now,
                expires_at,
            )
            .await
    }

    async fn release_generation(
        &self,
        session_id: &str,
        generation_id: &str,
    ) -> Result<bool, StoreError> {
        self.0
            .release_generation(&nul_free(session_id), &nul_free(generation_id))
            .await
    }

    async fn interrupt_streaming_of(
        &self,
        server_id: &str,
        now: Millis,
    ) -> Result<u64, StoreError> {
        self.0
            .interrupt_streaming_of(&nul_free(server_id), now)
            .await
    }
}

#[async_trait]
impl<S: CatalogStore> CatalogStore for NulSafe<S> {
    async fn create_agent(&self, a: &Agent) -> Result<(), StoreError> {
        self.0.create_agent(&agent(a)).await
    }

    async fn update_agent(&self, a: &Agent) -> Result<bool, StoreError> {
        self.0.update_agent(&agent(a)).await
    }

    async fn get_agent(&self, name: &str) -> Result<Option<Agent>, StoreError> {
        self.0.get_agent(&nul_free(name)).await
    }

    async fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.0.list_agents().await
    }

    async fn delete_agent(&self, name: &str) -> Result<bool, StoreError> {
        self.0.delete_agent(&nul_free(name)).await
    }

    async fn create_scene(&self, s: &Scene) -> Result<(), StoreError> {
        self.0.create_scene(&scene(s)).await
    }

    async fn update_scene(&self, s: &Scene) -> Result<bool, StoreError> {
        self.0.update_scene(&scene(s)).await
    }

    async fn get_scene(&self, name: &str) -> Result<Option<Scene>, StoreError> {
        self.0.get_scene(&nul_free(name)).await
    }

    async fn list_scenes(&self) -> Result<Vec<Scene>, StoreError> {
        self.0.list_scenes().await
    }

    async fn delete_scene(&self, name: &str) -> Result<bool, StoreError> {
        self.0.delete_scene(&nul_free(name)).await
    }

    async fn add_knowledge(&self, d: &KnowledgeDoc) -> Result<(), StoreError> {
        let d = KnowledgeDoc {
            id: owned(&d.id),
            title: owned(&d.title),
            content: owned(&d.content),
            tags: d.tags.iter().map(|t| owned(t)).collect(),
            created_at: d.created_at,
        };
        self.0.add_knowledge(&d).await
    }

    async fn search_knowledge(
        &self,
        query: &str,
        limit: u32,
    ) -> Result<Vec<KnowledgeHit>, StoreError> {
        self.0.search_knowledge(&nul_free(query), limit).await
    }
}

#[async_trait]
impl<S: TaskStore> TaskStore for NulSafe<S> {
    async fn create_task(&self, t: &Task) -> Result<(), StoreError> {
        let t = Task {
            id: owned(&t.id),
            user_id: owned(&t.user_id),
            key_id: opt(&t.key_id),
            agent: owned(&t.agent),
            scene: opt(&t.scene),
            input: owned(&t.input),
            result: opt(&t.result),
            reasoning: opt(&t.reasoning),
            error: opt(&t.error),
            ..t.clone()
        };
        self.0.create_task(&t).await
    }

    async fn get_task(&self, user_id: Option<&str>, id: &str) -> Result<Option<Task>, StoreError> {
        self.0
            .get_task(opt_ref(user_id).as_deref(), &nul_free(id))
            .await
    }

    async fn claim_task(&self, id: &str, now: Millis) -> Result<Option<Task>, StoreError> {
        self.0.claim_task(&nul_free(id), now).await
    }

    async fn set_task_progress(&self, id: &str, tokens: i64) -> Result<(), StoreError> {
        self.0.set_task_progress(&nul_free(id), tokens).await
    }

    async fn finish_task(
        &self,
        id: &str,
        status: TaskStatus,
        result: Option<&str>,
        reasoning: Option<&str>,
        error: Option<&str>,
        now: Millis,
    ) -> Result<bool, StoreError> {
        self.0
            .finish_task(
                &nul_free(id),
                status,
                opt_ref(result).as_deref(),
                opt_ref(reasoning).as_deref(),
                opt_ref(error).as_deref(),
                now,
            )
            .await
    }

    async fn cancel_task(
        &self,
        user_id: &str,
        id: &str,
        now: Millis,
    ) -> Result<Option<TaskStatus>, StoreError> {
        self.0
            .cancel_task(&nul_free(user_id), &nul_free(id), now)
            .await
    }

    async fn list_unfinished_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.0.list_unfinished_tasks().await
    }

    async fn task_position(&self, id: &str) -> Result<Option<u64>, StoreError> {
        self.0.task_position(&nul_free(id)).await
    }

    async fn count_queued_tasks(&self) -> Result<u64, StoreError> {
        self.0.count_queued_tasks().await
    }
}

#[async_trait]
impl<S: UsageStore> UsageStore for NulSafe<S> {
    async fn record_usage(&self, r: &UsageRecord) -> Result<(), StoreError> {
        let r = UsageRecord {
            id: owned(&r.id),
            user_id: owned(&r.user_id),
            key_id: opt(&r.key_id),
            session_id: opt(&r.session_id),
            provider: owned(&r.provider),
            model: owned(&r.model),
            ..r.clone()
        };
        self.0.record_usage(&r).await
    }

    async fn usage_summary(&self, from: Millis, to: Millis) -> Result<Vec<UsageRow>, StoreError> {
        self.0.usage_summary(from, to).await
    }
}

#[async_trait]
impl<S: ResponseStore> ResponseStore for NulSafe<S> {
    async fn insert_response(&self, r: &StoredResponse) -> Result<(), StoreError> {
        let r = StoredResponse {
            id: owned(&r.id),
            user_id: owned(&r.user_id),
            status: owned(&r.status),
            body: owned(&r.body),
            input_items: owned(&r.input_items),
            server: opt(&r.server),
            ..r.clone()
        };
        self.0.insert_response(&r).await
    }

    async fn finish_response(
        &self,
        id: &str,
        status: &str,
        body: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        self.0
            .finish_response(&nul_free(id), &nul_free(status), &nul_free(body), now)
            .await
    }

    async fn get_response(
        &self,
        user_id: &str,
        id: &str,
    ) -> Result<Option<StoredResponse>, StoreError> {
        self.0.get_response(&nul_free(user_id), &nul_free(id)).await
    }

    async fn delete_response(&self, user_id: &str, id: &str) -> Result<bool, StoreError> {
        self.0
            .delete_response(&nul_free(user_id), &nul_free(id))
            .await
    }

    async fn request_response_cancel(
        &self,
        user_id: &str,
        id: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        self.0
            .request_response_cancel(&nul_free(user_id), &nul_free(id), now)
            .await
    }

    async fn fail_unfinished_responses(
        &self,
        server_id: Option<&str>,
        now: Millis,
    ) -> Result<u64, StoreError> {
        let server_id = opt_ref(server_id);
        self.0
            .fail_unfinished_responses(server_id.as_deref(), now)
            .await
    }
}

fn agent(a: &Agent) -> Agent {
    Agent {
        id: owned(&a.id),
        name: owned(&a.name),
        provider: opt(&a.provider),
        model: owned(&a.model),
        system_prompt: opt(&a.system_prompt),
        fallback_models: a.fallback_models.iter().map(|m| owned(m)).collect(),
        ..a.clone()
    }
}

fn scene(s: &Scene) -> Scene {
    Scene {
        id: owned(&s.id),
        name: owned(&s.name),
        agent: owned(&s.agent),
        template: owned(&s.template),
        ..s.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_becomes_the_replacement_character() {
        assert_eq!(nul_free("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        assert!(matches!(nul_free("plain"), Cow::Borrowed("plain")));
    }
}
