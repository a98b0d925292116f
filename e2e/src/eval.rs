//! LoCoMo-format evaluation: memorize each conversation through a worker's HTTP API, then for
//! each question retrieve, answer with a chat model from the retrieved memories only, and let a
//! judge model grade the answer CORRECT or WRONG against the gold answer.
//!
//! Scores follow the convention behind memU's and Mem0's published LoCoMo numbers: accuracy over
//! categories 1–4 (single-hop, multi-hop, temporal, open-domain), with category 5 (adversarial:
//! the answer is not in the conversation) reported on its own. Retrieval recall@k is the share of
//! a question's evidence turns whose text is in the sources of the top-k retrieved items.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One LoCoMo sample: a two-speaker conversation in sessions, and questions about it.
#[derive(Clone, Debug, Deserialize)]
pub struct Sample {
    pub sample_id: String,
    /// `speaker_a`, `speaker_b`, `session_N` (turns) and `session_N_date_time`.
    pub conversation: serde_json::Map<String, Value>,
    pub qa: Vec<Question>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Turn {
    pub speaker: String,
    pub dia_id: String,
    pub text: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Question {
    pub question: String,
    /// Absent on adversarial questions (category 5).
    #[serde(default)]
    pub answer: Option<Value>,
    #[serde(default)]
    pub evidence: Vec<String>,
    pub category: u8,
}

#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Base URL of the memU worker (`http://127.0.0.1:8080`).
    pub worker_url: String,
    /// OpenAI-compatible base URL of the answer and judge models (`.../v1`).
    pub llm_url: String,
    pub api_key: Option<String>,
    /// API key of the worker (sent to the worker only, never to the LLM).
    pub worker_key: Option<String>,
    pub answer_model: String,
    pub judge_model: String,
    pub top_k: usize,
    /// `rag`, `hybrid` or `llm`.
    pub method: String,
    /// Prefix of the user ids the samples are memorized under (one user per sample).
    pub user_prefix: String,
    /// Most status polls per memorize task (0.5 s apart).
    pub max_polls: usize,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CategoryScore {
    pub questions: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub recall_at_k: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct QuestionResult {
    pub sample_id: String,
    pub category: u8,
    pub question: String,
    pub gold: String,
    pub answer: String,
    pub verdict: String,
    pub recall_at_k: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub worker_url: String,
    pub method: String,
    pub top_k: usize,
    pub answer_model: String,
    pub judge_model: String,
    /// Categories 1–4 together: the headline number.
    pub overall: CategoryScore,
    /// Category 5 (adversarial), reported separately.
    pub adversarial: CategoryScore,
    pub by_category: BTreeMap<u8, CategoryScore>,
    pub questions: Vec<QuestionResult>,
}

impl Report {
    /// A plain-text table of the scores.
    pub fn table(&self) -> String {
        let mut out = format!(
            "LoCoMo eval: method={} top_k={} answer={} judge={}\n{:<14} {:>9} {:>8} {:>9} {:>10}\n",
            self.method,
            self.top_k,
            self.answer_model,
            self.judge_model,
            "category",
            "questions",
            "correct",
            "accuracy",
            "recall@k"
        );
        let row = |name: &str, s: &CategoryScore| {
            format!(
                "{:<14} {:>9} {:>8} {:>8.1}% {:>10.3}\n",
                name,
                s.questions,
                s.correct,
                s.accuracy * 100.0,
                s.recall_at_k
            )
        };
        for (c, s) in &self.by_category {
            out.push_str(&row(&format!("{c} {}", category_name(*c)), s));
        }
        out.push_str(&row("overall (1-4)", &self.overall));
        out.push_str(&row("adversarial 5", &self.adversarial));
        out
    }
}

pub fn category_name(c: u8) -> &'static str {
    match c {
        1 => "single-hop",
        2 => "multi-hop",
        3 => "temporal",
        4 => "open-domain",
        5 => "adversarial",
        _ => "other",
    }
}

/// Sessions of a sample in order: (date text, turns).
pub fn sessions(sample: &Sample) -> anyhow::Result<Vec<(Option<String>, Vec<Turn>)>> {
    let mut numbered: Vec<(u32, Vec<Turn>)> = Vec::new();
    for (key, value) in &sample.conversation {
        let Some(n) = key
            .strip_prefix("session_")
            .and_then(|rest| rest.parse::<u32>().ok())
        else {
            continue;
        };
        let turns: Vec<Turn> = serde_json::from_value(value.clone()).with_context(|| {
            format!("sample {}: {key} is not a list of turns", sample.sample_id)
        })?;
        numbered.push((n, turns));
    }
    numbered.sort_by_key(|(n, _)| *n);
    Ok(numbered
        .into_iter()
        .map(|(n, turns)| {
            let date = sample
                .conversation
                .get(&format!("session_{n}_date_time"))
                .and_then(Value::as_str)
                .map(str::to_string);
            (date, turns)
        })
        .collect())
}

/// LoCoMo writes session times like `1:56 pm on 8 May, 2023`.
pub fn parse_session_date(text: &str) -> Option<String> {
    let normalized = text.trim().to_uppercase();
    chrono::NaiveDateTime::parse_from_str(&normalized, "%I:%M %p ON %d %B, %Y")
        .ok()
        .map(|t| t.and_utc().to_rfc3339())
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

struct Clients {
    http: reqwest::Client,
    options: EvalOptions,
}

impl Clients {
    /// `llm`: the request goes to the answer/judge models, else to the worker; each gets its
    /// own key.
    async fn post(&self, url: &str, body: &Value, llm: bool) -> anyhow::Result<Value> {
        let key = match llm {
            true => &self.options.api_key,
            false => &self.options.worker_key,
        };
        let mut request = self.http.post(url).json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {url}: HTTP {status}: {value}");
        }
        Ok(value)
    }

    async fn chat(
        &self,
        model: &str,
        system: &str,
        user: &str,
        json_mode: bool,
    ) -> anyhow::Result<String> {
        let mut body = json!({
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        });
        if json_mode {
            body["response_format"] = json!({"type": "json_object"});
        }
        let url = format!(
            "{}/chat/completions",
            self.options.llm_url.trim_end_matches('/')
        );
        let answer = self.post(&url, &body, true).await?;
        Ok(answer
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim()
            .to_string())
    }

    async fn memorize(&self, user_id: &str, sample: &Sample) -> anyhow::Result<()> {
        let speaker_a = sample
            .conversation
            .get("speaker_a")
            .and_then(Value::as_str)
            .unwrap_or("A")
            .to_string();
        let mut tasks = Vec::new();
        for (date, turns) in sessions(sample)? {
            let conversation: Vec<Value> = turns
                .iter()
                .map(|t| {
                    let role = if t.speaker == speaker_a {
                        "user"
                    } else {
                        "assistant"
                    };
                    json!({"role": role, "name": t.speaker, "content": t.text})
                })
                .collect();
            let mut body =
                json!({"user_id": user_id, "user_name": speaker_a, "conversation": conversation});
            if let Some(date) = date.as_deref().and_then(parse_session_date) {
                body["session_date"] = json!(date);
            }
            let url = format!("{}/api/v3/memory/memorize", self.options.worker_url);
            let queued = self.post(&url, &body, false).await?;
            tasks.push(text_of(&queued["task_id"]));
        }
        for task in tasks {
            let url = format!(
                "{}/api/v3/memory/memorize/status/{task}",
                self.options.worker_url
            );
            let mut done = false;
            for _ in 0..self.options.max_polls {
                let mut request = self.http.get(&url);
                if let Some(key) = &self.options.worker_key {
                    request = request.bearer_auth(key);
                }
                let status: Value = request.send().await?.json().await?;
                match status["status"].as_str() {
                    Some("SUCCESS") => {
                        done = true;
                        break;
                    }
                    Some("FAILED") => bail!("memorize task {task} failed: {}", status["error"]),
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            if !done {
                bail!("memorize task {task} did not finish");
            }
        }
        Ok(())
    }
}

const ANSWER_SYSTEM: &str = "You answer questions about a person's past conversations using only \
the memories given. Answer in a few words. If the memories do not contain the answer, say that \
it is not mentioned.";

const JUDGE_SYSTEM: &str = "You grade an answer to a question against the gold answer. Be \
generous with wording, dates written differently and extra detail, but the answer must state \
the same fact. Reply with a JSON object {\"verdict\": \"CORRECT\"} or {\"verdict\": \"WRONG\"}.";

/// Runs the data set; the worker must be up and reachable at `options.worker_url`.
pub async fn run(samples: &[Sample], options: EvalOptions) -> anyhow::Result<Report> {
    let clients = Clients {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?,
        options: options.clone(),
    };
    let mut results = Vec::new();
    for sample in samples {
        let user_id = format!("{}{}", options.user_prefix, sample.sample_id);
        clients.memorize(&user_id, sample).await?;
        let turns: BTreeMap<String, String> = sessions(sample)?
            .into_iter()
            .flat_map(|(_, t)| t)
            .map(|t| (t.dia_id, t.text))
            .collect();
        for qa in &sample.qa {
            let url = format!("{}/api/v3/memory/retrieve", options.worker_url);
            let found = clients
                .post(
                    &url,
                    &json!({"user_id": user_id, "query": qa.question, "top_k": options.top_k, "method": options.method}),
                    false,
                )
                .await?;
            let sources: Vec<String> = found["resources"]
                .as_array()
                .map(|r| r.iter().map(|r| text_of(&r["content"])).collect())
                .unwrap_or_default();
            let evidence: Vec<&String> = qa.evidence.iter().filter_map(|e| turns.get(e)).collect();
            let recall = if evidence.is_empty() {
                0.0
            } else {
                evidence
                    .iter()
                    .filter(|text| sources.iter().any(|s| s.contains(text.as_str())))
                    .count() as f64
                    / evidence.len() as f64
            };
            let mut memories: Vec<String> = found["categories"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .map(|c| format!("[{}] {}", text_of(&c["name"]), text_of(&c["summary"])))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(items) = found["items"].as_array() {
                for item in items {
                    let when = item["happened_at"].as_str().unwrap_or("");
                    memories.push(format!("({when}) {}", text_of(&item["summary"])));
                }
            }
            let answer = clients
                .chat(
                    &options.answer_model,
                    ANSWER_SYSTEM,
                    &format!(
                        "Memories:\n{}\n\nQuestion: {}",
                        memories.join("\n"),
                        qa.question
                    ),
                    false,
                )
                .await?;
            let gold = match (&qa.answer, qa.category) {
                (Some(a), _) => text_of(a),
                (None, _) => "Not mentioned in the conversation (a correct answer says so)".into(),
            };
            let verdict_text = clients
                .chat(
                    &options.judge_model,
                    JUDGE_SYSTEM,
                    &format!(
                        "Question: {}\nGold answer: {gold}\nAnswer: {answer}",
                        qa.question
                    ),
                    true,
                )
                .await?;
            let verdict = serde_json::from_str::<Value>(&verdict_text)
                .ok()
                .and_then(|v| v["verdict"].as_str().map(str::to_uppercase))
                .unwrap_or_else(|| {
                    if verdict_text.to_uppercase().contains("CORRECT")
                        && !verdict_text.to_uppercase().contains("WRONG")
                    {
                        "CORRECT".into()
                    } else {
                        "WRONG".into()
                    }
                });
            results.push(QuestionResult {
                sample_id: sample.sample_id.clone(),
                category: qa.category,
                question: qa.question.clone(),
                gold,
                answer,
                verdict,
                recall_at_k: recall,
            });
        }
    }
    Ok(score(&options, results))
}

/// Aggregates graded questions into the report.
pub fn score(options: &EvalOptions, questions: Vec<QuestionResult>) -> Report {
    let aggregate = |filter: &dyn Fn(&QuestionResult) -> bool| {
        let picked: Vec<&QuestionResult> = questions.iter().filter(|q| filter(q)).collect();
        let correct = picked.iter().filter(|q| q.verdict == "CORRECT").count();
        let n = picked.len();
        CategoryScore {
            questions: n,
            correct,
            accuracy: if n == 0 {
                0.0
            } else {
                correct as f64 / n as f64
            },
            recall_at_k: if n == 0 {
                0.0
            } else {
                picked.iter().map(|q| q.recall_at_k).sum::<f64>() / n as f64
            },
        }
    };
    let mut by_category = BTreeMap::new();
    for c in questions
        .iter()
        .map(|q| q.category)
        .collect::<std::collections::BTreeSet<_>>()
    {
        by_category.insert(c, aggregate(&|q| q.category == c));
    }
    Report {
        worker_url: options.worker_url.clone(),
        method: options.method.clone(),
        top_k: options.top_k,
        answer_model: options.answer_model.clone(),
        judge_model: options.judge_model.clone(),
        overall: aggregate(&|q| (1..=4).contains(&q.category)),
        adversarial: aggregate(&|q| q.category == 5),
        by_category,
        questions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locomo_session_times_parse() {
        assert_eq!(
            parse_session_date("1:56 pm on 8 May, 2023").as_deref(),
            Some("2023-05-08T13:56:00+00:00")
        );
        assert!(parse_session_date("sometime").is_none());
    }

    #[test]
    fn the_sample_data_set_reads_in_session_order() {
        let samples: Vec<Sample> =
            serde_json::from_str(include_str!("../eval/locomo-sample.json")).unwrap();
        let s = sessions(&samples[0]).unwrap();
        assert!(s.len() >= 2);
        assert!(s[0].1[0].dia_id.starts_with("D1:"));
        assert!(
            samples[0]
                .qa
                .iter()
                .any(|q| q.category == 5 && q.answer.is_none())
        );
    }
}
