//! MCP server: the memory API as tools an agent can call, over streamable HTTP on the API port
//! (`/mcp`) and over stdio (`memu-worker mcp`). Each tool is a thin adapter over the HTTP
//! handler of the same operation, so validation, tenancy and errors are the HTTP API's; the
//! caller is authenticated like it (bearer key over HTTP, `MEMU_API_KEY` over stdio) and each
//! tool checks the scope it needs, counts against the tenant's limits and is audited.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler, schemars, tool, tool_handler, tool_router};
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::api::auth::{Caller, audit};
use crate::api::error::{ApiError, ApiJson, ApiQuery};
use crate::api::{items, memu};
use crate::model::{MemoryType, TaskStatus};
use crate::service::MemoryService;
use crate::tenancy::ApiScope;

const INSTRUCTIONS: &str = "Long-term memory of the end users you talk with. \
Call `retrieve` with the user's message before answering to recall what you know about them \
(profile, events, preferences); call `memorize` with the conversation afterwards so it is \
remembered (extraction runs in the background: `memorize_status` tells when it is done). \
Every tool is scoped by `user_id`: memories never mix between users. `list_categories` and \
`list_memories` browse what is stored; `delete_memory` removes one wrong memory, `forget_user` \
erases everything about a user.";

/// Longest a `memorize` call may wait for its job.
const MAX_WAIT_SECS: u64 = 60;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct MessageArg {
    /// `user`, `assistant`, `system` or `tool`.
    pub role: String,
    /// What was said.
    pub content: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct MemorizeArgs {
    /// Your application's id of the end user this conversation is with.
    pub user_id: String,
    /// The agent that took part; memories and categories are kept per user and agent.
    pub agent_id: Option<String>,
    /// The user's display name, used in extracted memories ("Maria lives in Lisbon").
    pub user_name: Option<String>,
    pub agent_name: Option<String>,
    /// The conversation, oldest message first. Give this or `conversation_text`.
    pub conversation: Option<Vec<MessageArg>>,
    /// The conversation as text, one `speaker: text` line per message (speaker = role, user
    /// name or agent name).
    pub conversation_text: Option<String>,
    /// When the conversation happened: RFC 3339 time or YYYY-MM-DD (default: now).
    pub session_date: Option<String>,
    /// Wait up to this many seconds (at most 60) for the memories to be extracted; 0 or absent
    /// returns as soon as the job is queued.
    pub wait_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct StatusArgs {
    /// The `task_id` that `memorize` returned.
    pub task_id: String,
}

/// How `retrieve` ranks memories.
#[derive(Clone, Copy, Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MethodArg {
    /// Vector similarity (fast, no LLM call).
    Rag,
    /// Vector and keyword ranks fused: better for names, numbers and rare words.
    Hybrid,
    /// An LLM decides whether memory is needed and rewrites the query (slower, costs tokens).
    Llm,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RetrieveArgs {
    pub user_id: String,
    /// Only this agent's memories; every agent's when absent.
    pub agent_id: Option<String>,
    /// What to recall: usually the user's latest message.
    pub query: String,
    /// How many memories to return (default 5).
    pub top_k: Option<usize>,
    /// Only these kinds of memory.
    pub memory_types: Option<Vec<MemoryType>>,
    /// `rag` (default), `hybrid` or `llm`.
    pub method: Option<MethodArg>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ScopeArgs {
    pub user_id: String,
    /// One agent's data; when absent, `list_categories` shows the categories kept without an
    /// agent and `forget_user` erases the user entirely.
    pub agent_id: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListArgs {
    pub user_id: String,
    pub agent_id: Option<String>,
    /// Only these kinds of memory.
    pub memory_types: Option<Vec<MemoryType>>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct DeleteMemoryArgs {
    pub user_id: String,
    /// The memory's `id`, as `retrieve` or `list_memories` show it.
    pub memory_id: String,
}

/// The memory tools of one worker.
#[derive(Clone)]
pub struct MemoryTools {
    state: AppState,
    /// The key of a stdio session (`MEMU_API_KEY`); over HTTP each request brings its own.
    stdio_key: Option<Arc<str>>,
    tool_router: ToolRouter<Self>,
}

fn to_json<T: Serialize>(value: T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode the result: {e}"),
        )
    })
}

#[tool_router]
impl MemoryTools {
    pub fn new(service: Arc<MemoryService>, stdio_key: Option<String>) -> Self {
        Self {
            state: AppState { service },
            stdio_key: stdio_key.map(Arc::from),
            tool_router: Self::tool_router(),
        }
    }

    /// The authenticated caller: put in by the HTTP middleware, or the stdio session's key
    /// (checked on every call, so a revoked key stops working at once).
    async fn caller(&self, ctx: &RequestContext<RoleServer>) -> Result<Caller, ApiError> {
        if let Some(parts) = ctx.extensions.get::<axum::http::request::Parts>() {
            return parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "MCP route is not behind authentication",
                )
            });
        }
        let access = &self.state.service.access;
        let principal = access.authenticate(self.stdio_key.as_deref()).await?;
        access.admit(&principal).await?;
        Ok(Caller::new(principal))
    }

    /// Authorizes, runs and audits one tool call; API errors become tool errors the agent can
    /// read (`isError` with the same `error` body as the HTTP API).
    async fn call<F, Fut, T>(
        &self,
        ctx: &RequestContext<RoleServer>,
        tool: &str,
        scope: ApiScope,
        run: F,
    ) -> Result<CallToolResult, ErrorData>
    where
        F: FnOnce(AppState, Caller) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
        T: Serialize,
    {
        let caller = match self.caller(ctx).await {
            Ok(caller) => caller,
            Err(e) => return Ok(tool_error(e)),
        };
        let admitted = async {
            caller.principal.require(scope)?;
            if tool == "memorize" {
                self.state
                    .service
                    .access
                    .check_daily_quota(&caller.principal)
                    .await?;
            }
            Ok::<_, crate::access::AccessError>(())
        };
        let outcome = match admitted.await {
            Ok(()) => run(self.state.clone(), caller.clone())
                .await
                .and_then(to_json),
            Err(e) => Err(e.into()),
        };
        let status = match &outcome {
            Ok(_) => StatusCode::OK,
            Err(e) => e.status,
        };
        audit(&self.state, &caller, "MCP", format!("mcp:{tool}"), status).await;
        Ok(match outcome {
            Ok(value) => CallToolResult::structured(value),
            Err(e) => tool_error(e),
        })
    }

    /// Remember a conversation with an end user. Memories (profile facts, events, preferences,
    /// knowledge) are extracted in the background and filed into the user's categories; the
    /// same conversation sent twice is stored once.
    #[tool(annotations(destructive_hint = false, idempotent_hint = true))]
    async fn memorize(
        &self,
        Parameters(args): Parameters<MemorizeArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(
            &ctx,
            "memorize",
            ApiScope::Write,
            |state, caller| async move {
                let wait = args.wait_seconds.unwrap_or(0);
                if wait > MAX_WAIT_SECS {
                    return Err(ApiError::invalid(
                        "wait_seconds",
                        format!("wait_seconds must be at most {MAX_WAIT_SECS}"),
                    ));
                }
                let request = memu::MemorizeRequest {
                    user_id: args.user_id,
                    agent_id: args.agent_id,
                    user_name: args.user_name,
                    agent_name: args.agent_name,
                    session_date: args.session_date,
                    conversation: args.conversation.map(|messages| {
                        messages
                            .into_iter()
                            .map(|m| memu::ConversationMessage {
                                role: m.role,
                                content: memu::MessageContent::Text(m.content),
                                name: None,
                                created_at: None,
                            })
                            .collect()
                    }),
                    conversation_text: args.conversation_text,
                    override_config: None,
                };
                let (_, axum::Json(queued)) = memu::memorize(
                    State(state.clone()),
                    caller.clone(),
                    Default::default(),
                    ApiJson(request),
                )
                .await?;
                if wait == 0 {
                    return to_json(queued);
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
                loop {
                    let task = state
                        .service
                        .task(caller.tenant_id(), queued.task_id)
                        .await?;
                    let done = matches!(task.status, TaskStatus::Success | TaskStatus::Failed);
                    if done || tokio::time::Instant::now() >= deadline {
                        return to_json(memu::TaskStatusResponse::from(task));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        )
        .await
    }

    /// The state of a memorize job: PENDING, PROCESSING, SUCCESS or FAILED (with the error).
    #[tool(annotations(read_only_hint = true))]
    async fn memorize_status(
        &self,
        Parameters(args): Parameters<StatusArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(
            &ctx,
            "memorize_status",
            ApiScope::Read,
            |state, caller| async move {
                memu::memorize_status(State(state), caller, Path(args.task_id))
                    .await
                    .map(|axum::Json(body)| body)
            },
        )
        .await
    }

    /// Recall what is known about a user that matters for a query: the most relevant memory
    /// items (with scores), the user's most relevant category summaries, and the source
    /// conversations the items came from.
    #[tool(annotations(read_only_hint = true))]
    async fn retrieve(
        &self,
        Parameters(args): Parameters<RetrieveArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(
            &ctx,
            "retrieve",
            ApiScope::Read,
            |state, caller| async move {
                let request = memu::RetrieveRequest {
                    user_id: Some(args.user_id),
                    agent_id: args.agent_id,
                    query: Some(memu::Query::Text(args.query)),
                    top_k: args.top_k,
                    memory_types: args.memory_types,
                    method: args.method.map(|m| match m {
                        MethodArg::Rag => memu::RetrieveMethod::Rag,
                        MethodArg::Hybrid => memu::RetrieveMethod::Hybrid,
                        MethodArg::Llm => memu::RetrieveMethod::Llm,
                    }),
                    ..Default::default()
                };
                memu::retrieve(State(state), caller, ApiJson(request))
                    .await
                    .map(|axum::Json(body)| body)
            },
        )
        .await
    }

    /// The user's memory categories (personal info, preferences, work, ...) with the summary
    /// of what each holds.
    #[tool(annotations(read_only_hint = true))]
    async fn list_categories(
        &self,
        Parameters(args): Parameters<ScopeArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(
            &ctx,
            "list_categories",
            ApiScope::Read,
            |state, caller| async move {
                let request = memu::ScopeRequest {
                    user_id: Some(args.user_id),
                    agent_id: args.agent_id,
                    filter: None,
                };
                memu::categories(State(state), caller, ApiJson(request))
                    .await
                    .map(|axum::Json(body)| body)
            },
        )
        .await
    }

    /// The user's memory items, newest first, one page at a time.
    #[tool(annotations(read_only_hint = true))]
    async fn list_memories(
        &self,
        Parameters(args): Parameters<ListArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(
            &ctx,
            "list_memories",
            ApiScope::Read,
            |state, caller| async move {
                let memory_type = args.memory_types.map(|types| {
                    types
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                });
                let params = items::ListParams {
                    agent_id: args.agent_id,
                    memory_type,
                    since: None,
                    until: None,
                    limit: args.limit,
                    cursor: args.cursor,
                };
                items::list(State(state), caller, Path(args.user_id), ApiQuery(params))
                    .await
                    .map(|axum::Json(body)| body)
            },
        )
        .await
    }

    /// Delete one memory item of the user (for a memory that is wrong or unwanted).
    #[tool(annotations(destructive_hint = true, idempotent_hint = true))]
    async fn delete_memory(
        &self,
        Parameters(args): Parameters<DeleteMemoryArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(
            &ctx,
            "delete_memory",
            ApiScope::Write,
            |state, caller| async move {
                let memory_id = args.memory_id.clone();
                items::delete(State(state), caller, Path((args.user_id, args.memory_id))).await?;
                Ok(serde_json::json!({"deleted": true, "memory_id": memory_id}))
            },
        )
        .await
    }

    /// Erase everything stored about a user (memories, categories, conversations, queued
    /// jobs), or only what one agent holds when `agent_id` is given. Cannot be undone.
    #[tool(annotations(destructive_hint = true, idempotent_hint = true))]
    async fn forget_user(
        &self,
        Parameters(args): Parameters<ScopeArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(
            &ctx,
            "forget_user",
            ApiScope::Write,
            |state, caller| async move {
                let params = items::AgentParam {
                    agent_id: args.agent_id,
                };
                items::delete_user(State(state), caller, Path(args.user_id), ApiQuery(params))
                    .await
                    .map(|axum::Json(body)| body)
            },
        )
        .await
    }
}

fn tool_error(e: ApiError) -> CallToolResult {
    CallToolResult::structured_error(serde_json::json!({
        "status": e.status.as_u16(),
        "error": {"code": e.code, "message": e.message, "field": e.field},
    }))
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for MemoryTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "memu-worker",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(INSTRUCTIONS)
    }
}

/// The streamable-HTTP endpoint, stateless with JSON answers: any replica serves any request,
/// so no sticky sessions are needed behind a Service. The Host check guards unauthenticated
/// local servers against DNS rebinding; every request here needs a bearer key, and the
/// Host is whatever name the cluster routes by, so it is off.
pub fn http_service(
    service: Arc<MemoryService>,
) -> StreamableHttpService<MemoryTools, NeverSessionManager> {
    let max_body = service.config.server.max_body_bytes;
    StreamableHttpService::new(
        move || Ok(MemoryTools::new(service.clone(), None)),
        Arc::new(NeverSessionManager::default()),
        StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_max_request_body_bytes(max_body)
            .disable_allowed_hosts(),
    )
}

/// Serves the tools over stdin/stdout until the client closes them, with the memorize pipeline
/// beside them when the role runs it (an agent's private worker on the embedded store).
pub async fn serve_stdio(service: Arc<MemoryService>, key: Option<String>) -> anyhow::Result<()> {
    use rmcp::ServiceExt as _;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let pipeline = service
        .config
        .role
        .runs_pipeline()
        .then(|| tokio::spawn(crate::pipeline::run(service.clone(), stopped)));
    let running = MemoryTools::new(service, key)
        .serve(rmcp::transport::stdio())
        .await?;
    running.waiting().await?;
    let _ = stop.send(true);
    if let Some(pipeline) = pipeline {
        pipeline.await?;
    }
    Ok(())
}
