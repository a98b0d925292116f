//! Every prompt the worker sends, as versioned templates with the JSON schema of the answer.
//!
//! The version is stored with each memory item (`extra.prompt_version`), so items written by an
//! older prompt can be found and re-extracted after a change. Bump [`PROMPT_VERSION`] whenever a
//! template or schema changes meaning.

use serde_json::{Value, json};

use crate::model::MemoryType;

pub const PROMPT_VERSION: &str = "memu-prompts/2026-12-01.1";

/// A rendered prompt: system and user text plus the schema the answer must match.
#[derive(Clone, Debug)]
pub struct Prompt {
    /// Short name used for metrics, the cost log and the schema name.
    pub name: &'static str,
    pub system: String,
    pub user: String,
    pub schema: Value,
}

/// What each memory type means to the extractor.
pub fn memory_type_guide(t: MemoryType) -> &'static str {
    match t {
        MemoryType::Profile => {
            "stable facts about the user: identity, home, job, family, lasting preferences and traits"
        }
        MemoryType::Event => {
            "things that happened or will happen at a specific time: what, who, when, where"
        }
        MemoryType::Knowledge => {
            "facts or ideas the user learned, explained or asked to remember, independent of the user"
        }
        MemoryType::Behavior => "recurring patterns in how the user acts, decides or communicates",
        MemoryType::Skill => "abilities the user has or is building, with their level when stated",
        MemoryType::Tool => {
            "tools, apps, services and procedures the user uses, and how they use them"
        }
    }
}

const EXTRACT_SYSTEM: &str = "\
You turn one part of a conversation into durable memories about the user named {subject}.

Write each memory as one self-contained sentence in the third person that names {subject} \
(never \"the user\", \"I\" or \"you\"), keeping names, numbers, dates and places exactly as said. \
Only record what {subject} said or clearly confirmed; the assistant's suggestions are not facts \
about {subject}. Resolve relative dates (\"yesterday\", \"next Friday\") against the message \
times given. Skip small talk and anything that will not matter later. One fact per memory; \
do not repeat a fact under two types.

Memory types to extract (use no others):
{types}

Also write `caption`: one sentence saying what this part of the conversation is about.
Answer with a JSON object only.";

const EXTRACT_USER: &str = "\
Conversation part {part} of {parts}{session}:
{transcript}";

/// One extraction call per segment: a caption and the memory items of the allowed types.
pub fn extract(
    subject: &str,
    types: &[MemoryType],
    transcript: &str,
    part: usize,
    parts: usize,
    session_date: Option<&str>,
) -> Prompt {
    let type_list = types
        .iter()
        .map(|t| format!("- {}: {}", t.as_str(), memory_type_guide(*t)))
        .collect::<Vec<_>>()
        .join("\n");
    let names: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
    Prompt {
        name: "extract",
        system: EXTRACT_SYSTEM
            .replace("{subject}", subject)
            .replace("{types}", &type_list),
        user: EXTRACT_USER
            .replace("{part}", &part.to_string())
            .replace("{parts}", &parts.to_string())
            .replace(
                "{session}",
                &session_date
                    .map(|d| format!(" (session of {d})"))
                    .unwrap_or_default(),
            )
            .replace("{transcript}", transcript),
        schema: object(json!({
            "caption": {"type": "string"},
            "items": {"type": "array", "items": object(json!({
                "memory_type": {"type": "string", "enum": names},
                "summary": {"type": "string"},
                "happened_at": {"type": ["string", "null"],
                    "description": "ISO 8601 date or date-time the memory is about, if known"},
            }))},
        })),
    }
}

const RESOLVE_SYSTEM: &str = "\
You keep a user's memory free of repeats. Each new memory below comes with the existing memories \
most similar to it. For every new memory decide one action:
- \"new\": it says something none of the existing ones say;
- \"duplicate\": an existing one already says the same (give its id in `target`);
- \"update\": it adds detail to an existing one that is still true (give `target` and, in \
`merged`, one sentence that keeps both);
- \"contradiction\": it replaces an existing one that is no longer true (give `target`; the new \
memory wins).
Answer with a JSON object only, one decision per new memory, in order.";

/// One call for all new items that have near neighbours.
pub fn resolve(cases: &[(String, Vec<(String, String)>)]) -> Prompt {
    let mut user = String::new();
    for (i, (text, candidates)) in cases.iter().enumerate() {
        user.push_str(&format!("New memory {i}: {text}\n"));
        for (id, existing) in candidates {
            user.push_str(&format!("  existing {id}: {existing}\n"));
        }
    }
    Prompt {
        name: "resolve",
        system: RESOLVE_SYSTEM.to_string(),
        user,
        schema: object(json!({
            "decisions": {"type": "array", "items": object(json!({
                "new": {"type": "integer"},
                "action": {"type": "string", "enum": ["new", "duplicate", "update", "contradiction"]},
                "target": {"type": ["string", "null"]},
                "merged": {"type": ["string", "null"]},
            }))},
        })),
    }
}

const CATEGORIZE_SYSTEM: &str = "\
You file a user's memories into that user's categories and keep each category's summary current.

1. For every memory, list the categories it belongs to (one or more, by exact name) with a \
confidence from 0 to 1.
2. For every category that received a memory, rewrite its summary: a short paragraph about \
{subject} that merges the current summary with the new memories. Newer facts replace older ones \
they contradict; keep names, numbers and dates; leave out what belongs to other categories.
Use only the categories listed. Answer with a JSON object only.";

/// One call: categories of every new item and the new summaries of the touched categories.
pub fn categorize(
    subject: &str,
    categories: &[(String, String, String)],
    items: &[(MemoryType, String)],
) -> Prompt {
    let mut user = String::from("Categories (name: description | current summary):\n");
    for (name, description, summary) in categories {
        let summary = if summary.is_empty() {
            "(empty)"
        } else {
            summary
        };
        user.push_str(&format!("- {name}: {description} | {summary}\n"));
    }
    user.push_str("\nNew memories:\n");
    for (i, (t, text)) in items.iter().enumerate() {
        user.push_str(&format!("{i}. [{}] {text}\n", t.as_str()));
    }
    let names: Vec<&str> = categories.iter().map(|(n, _, _)| n.as_str()).collect();
    Prompt {
        name: "categorize",
        system: CATEGORIZE_SYSTEM.replace("{subject}", subject),
        user,
        schema: object(json!({
            "assignments": {"type": "array", "items": object(json!({
                "item": {"type": "integer"},
                "categories": {"type": "array", "items": object(json!({
                    "name": {"type": "string", "enum": names},
                    "confidence": {"type": "number"},
                }))},
            }))},
            "summaries": {"type": "array", "items": object(json!({
                "category": {"type": "string", "enum": names},
                "summary": {"type": "string"},
            }))},
        })),
    }
}

const ROUTE_SYSTEM: &str = "\
You decide whether answering the user's latest message needs the user's stored memories \
(their facts, history, preferences) and, if so, rewrite it as one standalone search query: \
resolve pronouns and references from the earlier messages and keep names, numbers and dates. \
Greetings, chit-chat and general knowledge need no memories. Answer with a JSON object only.";

pub fn route(context: &[(String, String)], query: &str) -> Prompt {
    let mut user = String::new();
    if !context.is_empty() {
        user.push_str("Earlier messages:\n");
        for (role, content) in context {
            user.push_str(&format!("{role}: {content}\n"));
        }
        user.push('\n');
    }
    user.push_str(&format!("Latest message: {query}"));
    Prompt {
        name: "route",
        system: ROUTE_SYSTEM.to_string(),
        user,
        schema: object(json!({
            "needs_memory": {"type": "boolean"},
            "query": {"type": "string"},
        })),
    }
}

const SUFFICIENT_SYSTEM: &str = "\
Given a question and what has been recalled from the user's memory so far, say whether it is \
enough to answer the question. If not, give a better search query for finding the rest (keep \
names, numbers and dates). Answer with a JSON object only.";

/// After a retrieval tier: is what was found enough to answer?
pub fn sufficient(query: &str, tier: &str, recalled: &[String]) -> Prompt {
    let mut user = format!("Question: {query}\n\nRecalled {tier}:\n");
    if recalled.is_empty() {
        user.push_str("(nothing)\n");
    }
    for line in recalled {
        user.push_str(&format!("- {line}\n"));
    }
    Prompt {
        name: "sufficient",
        system: SUFFICIENT_SYSTEM.to_string(),
        user,
        schema: object(json!({
            "sufficient": {"type": "boolean"},
            "query": {"type": "string"},
        })),
    }
}

/// Asks a vision model to put an image into words that memorize can extract from.
pub const DESCRIBE_IMAGE: &str = "Describe this image for a personal memory: who and what is in \
it, any text it shows (verbatim), the place and the time if visible. Plain prose, no preamble.";

/// Sent after an answer that was not valid JSON (the one repair attempt).
pub fn repair(error: &str) -> String {
    format!(
        "Your answer could not be used: {error}. Answer again with only the JSON object, \
         complete and matching the requested fields."
    )
}

/// Appended to the system prompt for providers without `json_schema` structured outputs.
pub fn schema_instruction(schema: &Value) -> String {
    format!("\n\nThe JSON object must match this JSON Schema:\n{schema}")
}

/// A strict-mode object schema: every property required, nothing else allowed.
fn object(properties: Value) -> Value {
    let required: Vec<String> = properties
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_are_strict_objects() {
        let p = extract("Maria", &[MemoryType::Profile], "user: hi", 1, 1, None);
        assert_eq!(p.schema["additionalProperties"], false);
        assert_eq!(p.schema["required"], json!(["caption", "items"]));
        let item = &p.schema["properties"]["items"]["items"];
        assert_eq!(
            item["properties"]["memory_type"]["enum"],
            json!(["profile"])
        );
        assert_eq!(item["required"].as_array().unwrap().len(), 3);
        assert!(p.system.contains("Maria") && !p.system.contains("{subject}"));
    }

    #[test]
    fn categorize_lists_only_the_users_categories() {
        let p = categorize(
            "Maria",
            &[("work_life".into(), "jobs".into(), String::new())],
            &[(MemoryType::Profile, "Maria is a biologist.".into())],
        );
        assert!(p.user.contains("- work_life: jobs | (empty)"));
        assert!(p.user.contains("0. [profile] Maria is a biologist."));
        assert_eq!(
            p.schema["properties"]["summaries"]["items"]["properties"]["category"]["enum"],
            json!(["work_life"])
        );
    }
}
