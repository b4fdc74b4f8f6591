//! Issue 33, one model over several ranks: a `[distributed]` preset of the real
//! test model split over three processes on this machine (MLX's ring backend over
//! loopback, tensor parallel by mlx-lm's own `shard()`), served as one slot.
//! Greedy answers equal the single-process worker's, batched and streamed; a rank
//! killed tears the whole group down (no process of it survives), the request it
//! was serving gets the error, the queued one is answered by the next group (with
//! the replay engine's ranks, which meet over the same collectives at every step,
//! in a fraction of the time); a model the group cannot split is refused at load
//! with the reason.
//! (Slow on two cores: every decode step is ~60 all-sums between three processes.)

mod common;

use std::time::{Duration, Instant};

use common::{daemon, post_json, workers_named, Daemon};
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// The two group tests take turns: six ranks at once on two cores would each
/// wait for the others at every collective.
static ONE_GROUP_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const PROMPTS: [&str; 3] = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Name three colors.",
];

fn ask(model: &str, prompt: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 6,
        "temperature": 0,
    })
}

async fn answer(d: &Daemon, body: Value) -> String {
    let (status, v) = post_json(&format!("{}/v1/chat/completions", d.url), &body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The live ranks of `model`, and which of them follow (ranks 1..).
fn ranks_of(model: &str) -> Vec<(u32, bool)> {
    workers_named(model)
        .into_iter()
        .map(|p| (p.pid, p.cmdline.contains("--follower")))
        .collect()
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let began = Instant::now();
    while !done() {
        assert!(began.elapsed() < limit, "never {what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    began.elapsed()
}

async fn start(d: &Daemon, model: &str) -> (u16, Value) {
    d.admin("start", Some(json!({ "model": model }))).await
}

#[tokio::test(flavor = "multi_thread")]
async fn three_ranks_answer_as_one_process_does() {
    let _turn = ONE_GROUP_AT_A_TIME.lock().await;
    let d = daemon();
    let model = "smollm2-135m-tp3";
    let mut alone = vec![];
    for prompt in PROMPTS {
        alone.push(answer(d, ask("smollm2-135m", prompt)).await);
    }

    let (status, v) = start(d, model).await;
    assert_eq!(status, 200, "{v}");
    let ranks = ranks_of(model);
    assert_eq!(ranks.len(), 3, "{ranks:?}");
    assert_eq!(ranks.iter().filter(|(_, f)| *f).count(), 2, "{ranks:?}");

    // Together, one of them streamed: the group batches them, as one process would,
    // and the stream carries the same text delta by delta.
    let mut streamed_body = ask(model, PROMPTS[0]);
    streamed_body["stream"] = json!(true);
    let streamed = async {
        reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", d.url))
            .json(&streamed_body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let (together, text) = tokio::join!(
        futures::future::join_all(PROMPTS.map(|p| answer(d, ask(model, p)))),
        streamed
    );
    assert_eq!(
        together, alone,
        "greedy answers of the group and of one process"
    );
    let mut deltas = String::new();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        deltas.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(deltas, alone[0]);

    // Stopping the preset stops every rank.
    let (status, v) = d.admin("stop", Some(json!({ "model": model }))).await;
    assert_eq!(status, 200, "{v}");
    wait_until(
        "every rank gone after stop",
        Duration::from_secs(30),
        || ranks_of(model).is_empty(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rank_killed_takes_its_group_down_and_the_queue_survives() {
    let _turn = ONE_GROUP_AT_A_TIME.lock().await;
    let d = daemon();
    let model = "replay-tp3-one";
    let (status, v) = start(d, model).await;
    assert_eq!(status, 200, "{v}");
    let first = ranks_of(model);
    assert_eq!(first.len(), 3, "{first:?}");
    let follower = first.iter().find(|(_, f)| *f).unwrap().0;

    // A long answer streaming, and a second request queued behind it.
    let mut story = ask(
        model,
        "Write a long story about a dragon who learns to fly.",
    );
    story["max_tokens"] = json!(200);
    story["stream"] = json!(true);
    let mut stream = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", d.url))
        .json(&story)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while seen.matches("\"content\":\"").count() < 2 {
        let chunk = stream
            .chunk()
            .await
            .unwrap()
            .expect("the stream ended early");
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let queued = tokio::spawn(answer(d, ask(model, PROMPTS[1])));
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.ps_row(model).await.unwrap()["queued"] != 1 {
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follower as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let last = seen.trim_end().rsplit("data: ").next().unwrap();
    let v: Value = serde_json::from_str(last).unwrap_or_else(|_| panic!("{seen}"));
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{seen}"));
    assert!(
        message.contains("rank") && message.contains("SIGKILL"),
        "{message}"
    );
    assert!(
        !seen.contains("[DONE]"),
        "a failed stream claimed its end: {seen}"
    );

    // No process of the first group survives.
    let old: Vec<u32> = first.iter().map(|(pid, _)| *pid).collect();
    wait_until("the first group gone", Duration::from_secs(10), || {
        ranks_of(model).iter().all(|(pid, _)| !old.contains(pid))
    })
    .await;
    let torn_down = killed.elapsed();
    // The queued request is answered by the next group.
    let text = queued.await.unwrap();
    assert!(!text.is_empty());
    let ready_again = killed.elapsed();
    let row = d.ps_row(model).await.unwrap();
    assert_eq!(row["incarnation"], 2, "{row}");
    let last_exit = row["last_exit"].as_str().unwrap();
    assert!(
        last_exit.starts_with("rank 1 of 3") || last_exit.starts_with("rank 2 of 3"),
        "{last_exit}"
    );
    assert_eq!(ranks_of(model).len(), 3);
    eprintln!(
        "a rank's SIGKILL: group torn down in {torn_down:?}, queued answer after {ready_again:?}"
    );
    let (status, v) = d.admin("stop", Some(json!({ "model": model }))).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_the_group_cannot_split_is_refused_with_the_reason() {
    let d = daemon();
    let model = "smollm2-135m-tp2";
    let (status, v) = start(d, model).await;
    assert_ne!(status, 200, "{v}");
    let message = v.to_string();
    assert!(
        message.contains("tensor parallel over 2 ranks")
            && message.contains("attention heads (9)")
            && message.contains("divide by 2"),
        "{message}"
    );
    d.admin("stop", Some(json!({ "model": model }))).await;
    wait_until("the refused group gone", Duration::from_secs(10), || {
        ranks_of(model).is_empty()
    })
    .await;
}
