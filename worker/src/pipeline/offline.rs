//! Offline extraction: what memorize can do honestly without an LLM.
//!
//! Conversations are cut into segments within a token budget, each kept as an `event` item; the
//! user's own first-person statements about stable facts ("I live in Berlin", "My sister is a
//! nurse") become `profile` items rewritten in the third person. Nothing is invented: a sentence
//! that matches no rule yields no profile item.

use std::sync::LazyLock;

use regex::Regex;

use crate::model::Message;

/// A rough token count (≈ 0.75 words per token for English; CJK counts per character).
pub fn estimate_tokens(text: &str) -> usize {
    let cjk = text
        .chars()
        .filter(|c| ('\u{3000}'..='\u{9fff}').contains(c) || ('\u{ac00}'..='\u{d7af}').contains(c))
        .count();
    let words = text.split_whitespace().count();
    cjk + (words * 4).div_ceil(3)
}

/// Consecutive messages that fit the token budget (a longer single message is its own segment).
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub first: usize,
    pub messages: Vec<Message>,
}

impl Segment {
    /// `role: content` lines, the text an event item stores and embeds.
    pub fn text(&self) -> String {
        self.messages
            .iter()
            .map(|m| {
                format!(
                    "{}: {}",
                    m.name.as_deref().unwrap_or(&m.role),
                    m.content.trim()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub fn segment(messages: &[Message], max_tokens: usize) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut current: Vec<Message> = Vec::new();
    let mut first = 0;
    let mut budget = 0;
    for (i, message) in messages.iter().enumerate() {
        let tokens = estimate_tokens(&message.content) + 2;
        if !current.is_empty() && budget + tokens > max_tokens {
            out.push(Segment {
                first,
                messages: std::mem::take(&mut current),
            });
            budget = 0;
        }
        if current.is_empty() {
            first = i;
        }
        budget += tokens;
        current.push(message.clone());
    }
    if !current.is_empty() {
        out.push(Segment {
            first,
            messages: current,
        });
    }
    out
}

static SENTENCE_END: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:[.!;。！；]+\s+|[.!。！]+$|\n+)").expect("valid regex"));

/// Verbs after "I" that state something stable about the speaker.
const STATIVE_VERBS: &[&str] = &[
    "am",
    "was",
    "work",
    "worked",
    "live",
    "lived",
    "like",
    "love",
    "prefer",
    "hate",
    "dislike",
    "enjoy",
    "have",
    "had",
    "own",
    "study",
    "studied",
    "grew",
    "moved",
    "speak",
    "play",
    "teach",
    "come",
    "came",
    "graduated",
    "use",
    "drive",
    "cook",
    "run",
    "believe",
    "support",
];

/// Adverbs of frequency that may stand between "I" and the verb.
const FREQUENCY: &[&str] = &["usually", "always", "never", "often", "sometimes", "really"];

fn third_person(verb: &str) -> String {
    match verb {
        "am" => "is".into(),
        "have" => "has".into(),
        "was" | "had" => verb.into(),
        v if v.ends_with("ed") || matches!(v, "grew" | "came" | "ran") => v.into(),
        v if v.ends_with('y') && !v.ends_with("ay") && !v.ends_with("ey") && !v.ends_with("oy") => {
            format!("{}ies", &v[..v.len() - 1])
        }
        v if v.ends_with('s')
            || v.ends_with("sh")
            || v.ends_with("ch")
            || v.ends_with('x')
            || v.ends_with('o') =>
        {
            format!("{v}es")
        }
        v => format!("{v}s"),
    }
}

/// Rewrites first-person words after the subject: my → their, me → them, and a further
/// "I <verb>" (as in "... and I work as ...") → "<verb>s".
fn rest_in_third_person(words: &[&str]) -> String {
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let (core, tail) = split_trailing_punct(words[i]);
        let lower = core.to_ascii_lowercase();
        if lower == "i"
            && let Some(next) = words.get(i + 1)
        {
            let (verb, verb_tail) = split_trailing_punct(next);
            let verb = verb.to_ascii_lowercase();
            if STATIVE_VERBS.contains(&verb.as_str()) {
                out.push(format!("{}{verb_tail}", third_person(&verb)));
                i += 2;
                continue;
            }
        }
        let replaced = match lower.as_str() {
            "my" => "their",
            "me" => "them",
            "mine" => "theirs",
            "myself" => "themselves",
            "i" => "they",
            "i'm" | "i’m" => "they are",
            _ => core,
        };
        out.push(format!("{replaced}{tail}"));
        i += 1;
    }
    out.join(" ")
}

fn split_trailing_punct(word: &str) -> (&str, &str) {
    let cut = word
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_punctuation() && *c != '\'')
        .last()
        .map(|(i, _)| i)
        .unwrap_or(word.len());
    word.split_at(cut)
}

/// A profile statement from one sentence of the user, in the third person, if a rule matches.
pub fn profile_statement(sentence: &str, subject: &str) -> Option<String> {
    let sentence = sentence
        .trim()
        .trim_end_matches(['.', '!', ';', '。', '！']);
    if sentence.contains('?') {
        return None;
    }
    let words: Vec<&str> = sentence.split_whitespace().collect();
    if !(3..=40).contains(&words.len()) {
        return None;
    }
    let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
    let statement = match lower[0].as_str() {
        "my" => format!("{subject}'s {}", rest_in_third_person(&words[1..])),
        "i'm" | "i’m" => format!("{subject} is {}", rest_in_third_person(&words[1..])),
        "i've" | "i’ve" => format!("{subject} has {}", rest_in_third_person(&words[1..])),
        "i" => {
            let mut at = 1;
            let mut adverbs = Vec::new();
            while at < lower.len() && FREQUENCY.contains(&lower[at].as_str()) {
                adverbs.push(words[at]);
                at += 1;
            }
            let verb = lower.get(at)?;
            if !STATIVE_VERBS.contains(&verb.as_str()) {
                return None;
            }
            let mut parts = vec![subject.to_string()];
            parts.extend(adverbs.iter().map(|a| a.to_string()));
            parts.push(third_person(verb));
            let rest = rest_in_third_person(&words[at + 1..]);
            if !rest.is_empty() {
                parts.push(rest);
            }
            parts.join(" ")
        }
        _ => return None,
    };
    Some(format!("{statement}."))
}

/// Profile statements of the user's messages, in order, without repeats.
pub fn profile_statements(messages: &[Message], subject: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for message in messages.iter().filter(|m| m.role == "user") {
        for sentence in SENTENCE_END.split(&message.content) {
            if let Some(s) = profile_statement(sentence, subject)
                && !out.contains(&s)
            {
                out.push(s);
            }
        }
    }
    out
}

/// A one-line caption of a conversation: its size and how it starts.
pub fn caption(messages: &[Message]) -> String {
    let opening = messages
        .iter()
        .find(|m| m.role == "user")
        .or(messages.first())
        .map(|m| m.content.trim())
        .unwrap_or_default();
    let mut short: String = opening.chars().take(120).collect();
    if opening.chars().count() > 120 {
        short.push('…');
    }
    format!("Conversation of {} messages: {short}", messages.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            name: None,
            created_at: None,
        }
    }

    #[test]
    fn first_person_facts_become_third_person_profile_items() {
        let cases = [
            (
                "I live in Berlin with my wife.",
                Some("The user lives in Berlin with their wife."),
            ),
            (
                "I'm a nurse at the city hospital",
                Some("The user is a nurse at the city hospital."),
            ),
            (
                "My favorite food is ramen!",
                Some("The user's favorite food is ramen."),
            ),
            (
                "I usually study at night",
                Some("The user usually studies at night."),
            ),
            ("I have two cats", Some("The user has two cats.")),
            (
                "I live in Lisbon and I work as a biologist",
                Some("The user lives in Lisbon and works as a biologist."),
            ),
            (
                "I moved to Lisbon in 2021",
                Some("The user moved to Lisbon in 2021."),
            ),
            ("I want a pizza tonight", None),
            ("Do I like jazz?", None),
            ("I am", None),
            ("The weather is nice today", None),
        ];
        for (input, expected) in cases {
            assert_eq!(
                profile_statement(input, "The user").as_deref(),
                expected,
                "for {input:?}"
            );
        }
        assert_eq!(
            profile_statement("I work as a pilot", "Alice").as_deref(),
            Some("Alice works as a pilot.")
        );
    }

    #[test]
    fn only_user_messages_yield_profile_statements() {
        let messages = [
            msg("user", "Hi there. I live in Oslo. Can you help me?"),
            msg("assistant", "I am an assistant. I live in the cloud."),
            msg("user", "I live in Oslo."),
        ];
        assert_eq!(
            profile_statements(&messages, "The user"),
            vec!["The user lives in Oslo.".to_string()]
        );
    }

    #[test]
    fn segments_respect_the_budget_and_keep_order() {
        let messages: Vec<Message> = (0..10)
            .map(|i| {
                msg(
                    if i % 2 == 0 { "user" } else { "assistant" },
                    &"word ".repeat(30),
                )
            })
            .collect();
        let segments = segment(&messages, 100);
        assert!(segments.len() > 1);
        assert_eq!(segments.iter().map(|s| s.messages.len()).sum::<usize>(), 10);
        for s in &segments {
            let tokens: usize = s
                .messages
                .iter()
                .map(|m| estimate_tokens(&m.content) + 2)
                .sum();
            assert!(tokens <= 100 || s.messages.len() == 1);
        }
        assert_eq!(segments[1].first, segments[0].messages.len());
        // A single oversized message is still kept.
        let big = [msg("user", &"word ".repeat(500))];
        assert_eq!(segment(&big, 50).len(), 1);
    }
}
