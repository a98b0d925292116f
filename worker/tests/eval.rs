//! The LoCoMo evaluation runner end to end: a real worker over HTTP (offline pipeline, stub
//! embeddings) and the stub as the answer and judge models, with scripted verdicts.

mod common;

use common::TestServer;
use memu_e2e::eval::{EvalOptions, Sample, run};
use memu_e2e::openai_stub::{Endpoint, Scripted};

#[tokio::test]
async fn eval_scores_categories_one_to_four_and_adversarial_apart() {
    let stub = common::stub().await;
    let (config, _db) = common::with_backend(common::stub_config(&stub), false).await;
    let server = TestServer::start(config).await;
    let samples: Vec<Sample> =
        serde_json::from_str(include_str!("../../e2e/eval/locomo-sample.json")).unwrap();
    // Per question: the answer, then the judge's verdict.
    let verdicts = ["CORRECT", "CORRECT", "WRONG", "CORRECT", "CORRECT"];
    for verdict in verdicts {
        for content in [
            "an answer".to_string(),
            format!(r#"{{"verdict": "{verdict}"}}"#),
        ] {
            stub.enqueue(
                Endpoint::Chat,
                Scripted {
                    content: Some(content),
                    ..Default::default()
                },
            );
        }
    }
    let report = run(
        &samples,
        EvalOptions {
            worker_url: server.base.clone(),
            llm_url: stub.base_url(),
            api_key: None,
            worker_key: Some(server.api_key.clone()),
            answer_model: "answer-model".into(),
            judge_model: "judge-model".into(),
            top_k: 10,
            method: "hybrid".into(),
            user_prefix: "eval-".into(),
            max_polls: 200,
        },
    )
    .await
    .unwrap();
    assert_eq!(report.overall.questions, 4);
    assert_eq!(report.overall.correct, 3);
    assert!((report.overall.accuracy - 0.75).abs() < 1e-9);
    assert_eq!(report.adversarial.questions, 1);
    assert_eq!(report.adversarial.correct, 1);
    assert_eq!(report.by_category.len(), 5);
    assert_eq!(report.judge_model, "judge-model");
    // Both sessions are small: the top 10 items' sources hold every evidence turn.
    assert!(
        (report.overall.recall_at_k - 1.0).abs() < 1e-9,
        "{report:?}"
    );
    let table = report.table();
    assert!(
        table.contains("overall (1-4)") && table.contains("75.0%"),
        "{table}"
    );
    // The answer prompt carried memories retrieved from the worker.
    let chats: Vec<_> = stub
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::Chat)
        .collect();
    assert_eq!(chats.len(), 10);
    let prompt = chats[0].body["messages"][1]["content"].as_str().unwrap();
    assert!(prompt.contains("Lisbon"), "{prompt}");
    assert_eq!(chats[1].body["model"], "judge-model");
    server.stop().await.unwrap();
}
