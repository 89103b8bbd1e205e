//! `troupe workflow run FILE --input TEXT`: registers a definition with a node, starts an
//! execution, follows its Server-Sent Events with a line per running step (a bar filling
//! towards the step's deadline on a terminal, one line per event otherwise), and prints the
//! final table of step timings. Exits 0 when the execution succeeded, 1 otherwise.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// A node address: `http://host:port`.
struct Target {
    host: String,
    token: Option<String>,
}

impl Target {
    fn parse(url: &str, token: Option<String>) -> anyhow::Result<Target> {
        let host = url
            .strip_prefix("http://")
            .with_context(|| format!("`{url}`: only http:// node URLs"))?
            .trim_end_matches('/')
            .to_owned();
        Ok(Target { host, token })
    }

    fn connect(&self) -> anyhow::Result<TcpStream> {
        let addr = self
            .host
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("`{}` resolves to nothing", self.host))?;
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {}", self.host))
    }

    fn send(
        &self,
        s: &mut TcpStream,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> anyhow::Result<()> {
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        )?;
        Ok(())
    }

    /// One request; the status and the JSON body.
    fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> anyhow::Result<(u16, Value)> {
        let mut s = self.connect()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        self.send(&mut s, method, path, content_type, body)?;
        let mut r = BufReader::new(s);
        let (status, chunked) = head(&mut r)?;
        let mut raw = Vec::new();
        if chunked {
            while let Some(chunk) = next_chunk(&mut r)? {
                raw.extend_from_slice(&chunk);
            }
        } else {
            r.read_to_end(&mut raw)?;
        }
        let v = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Ok((status, v))
    }
}

/// Reads the status line and headers: the status, and whether the body is chunked.
fn head(r: &mut impl BufRead) -> anyhow::Result<(u16, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {line:?}"))?;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        let l = line.to_ascii_lowercase();
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

fn next_chunk(r: &mut impl BufRead) -> anyhow::Result<Option<Vec<u8>>> {
    let mut size = String::new();
    if r.read_line(&mut size)? == 0 {
        return Ok(None);
    }
    let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
        .with_context(|| format!("bad chunk size {size:?}"))?;
    if n == 0 {
        return Ok(None);
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf)?;
    buf.truncate(n);
    Ok(Some(buf))
}

fn error_of(v: &Value) -> String {
    match (v["error"].as_str(), v["message"].as_str()) {
        (Some(code), Some(m)) => format!("{code}: {m}"),
        _ => v.to_string(),
    }
}

#[derive(Default)]
struct StepLine {
    state: String,
    since: Option<Instant>,
    deadline: Option<Duration>,
}

fn bar(elapsed: Duration, deadline: Option<Duration>) -> String {
    let Some(d) = deadline.filter(|d| !d.is_zero()) else {
        return " ".repeat(22);
    };
    let filled = ((elapsed.as_secs_f64() / d.as_secs_f64()).min(1.0) * 20.0).round() as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(20 - filled))
}

/// Runs the command; `Ok(true)` when the execution succeeded.
pub fn run(file: &Path, input: &str, node: &str, token: Option<String>) -> anyhow::Result<bool> {
    let target = Target::parse(node, token)?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let content_type = match file.extension().and_then(|e| e.to_str()) {
        Some("toml") => "application/toml",
        Some("yaml" | "yml") => "application/yaml",
        Some("json") => "application/json",
        _ => bail!(
            "{}: the file must end in .toml, .yaml, .yml or .json",
            file.display()
        ),
    };
    let (status, v) = target.call("POST", "/v1/workflows", content_type, &text)?;
    if status != 201 {
        bail!(
            "the node refused the definition ({status}): {}",
            error_of(&v)
        );
    }
    let name = v["workflow"].as_str().unwrap_or("").to_owned();
    let (_, def) = target.call("GET", "/v1/workflows", "application/json", "")?;
    let deadlines: BTreeMap<String, Duration> = def["workflows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["name"] == name.as_str())
        .flat_map(|w| w["steps"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| {
            let t = s["timeout"]
                .as_str()
                .and_then(|t| humantime::parse_duration(t).ok())
                .unwrap_or(Duration::from_secs(30));
            Some((s["name"].as_str()?.to_owned(), t))
        })
        .collect();
    let body = serde_json::json!({ "input": input }).to_string();
    let (status, v) = target.call(
        "POST",
        &format!("/v1/workflows/{name}/executions"),
        "application/json",
        &body,
    )?;
    if status != 202 {
        bail!("the node did not start it ({status}): {}", error_of(&v));
    }
    let id = v["id"].as_u64().context("no execution id")?;
    println!("workflow {name}: execution {id}");
    follow(&target, id, &deadlines)?;
    let (_, v) = target.call(
        "GET",
        &format!("/v1/executions/{id}"),
        "application/json",
        "",
    )?;
    print_table(&v);
    Ok(v["status"] == "succeeded")
}

/// Follows the execution's event stream until `finished`.
fn follow(target: &Target, id: u64, deadlines: &BTreeMap<String, Duration>) -> anyhow::Result<()> {
    let mut s = target.connect()?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    target.send(
        &mut s,
        "GET",
        &format!("/v1/executions/{id}/events"),
        "text/event-stream",
        "",
    )?;
    let mut r = BufReader::new(s);
    let (status, chunked) = head(&mut r)?;
    if status != 200 || !chunked {
        bail!("the event stream answered {status}");
    }
    let tty = std::io::stdout().is_terminal();
    let mut steps: BTreeMap<String, StepLine> = deadlines
        .iter()
        .map(|(n, d)| {
            (
                n.clone(),
                StepLine {
                    state: "waiting".into(),
                    deadline: Some(*d),
                    ..StepLine::default()
                },
            )
        })
        .collect();
    let mut drawn = 0;
    let mut pending = String::new();
    let mut finished = false;
    while !finished {
        match next_chunk(&mut r) {
            Ok(Some(chunk)) => pending.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(None) => break,
            Err(e) => {
                let timed_out = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                });
                if !timed_out {
                    return Err(e);
                }
            }
        }
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let Ok(e) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let kind = e["kind"].as_str().unwrap_or("");
            let step = e["step"].as_str().map(str::to_owned);
            let detail = e["detail"].as_str().unwrap_or("");
            if !tty {
                println!(
                    "{:>8} ms  {kind:<14} {} {detail}",
                    e["elapsed_ms"],
                    step.as_deref().unwrap_or("")
                );
            }
            if let Some(n) = &step {
                let line = steps.entry(n.clone()).or_default();
                match kind {
                    "step_queued" if line.since.is_none() => {
                        line.since = Some(Instant::now());
                        line.state = "queued".into();
                    }
                    "step_started" => line.state = "running".into(),
                    "step_retried" | "step_fallback" => line.state = kind.replace("step_", ""),
                    "warned" => line.state = "running (warned)".into(),
                    "step_finished" => {
                        line.state = detail.to_owned();
                        line.since = None;
                    }
                    "step_skipped" => line.state = "skipped".into(),
                    _ => {}
                }
            }
            if kind == "finished" {
                finished = true;
                if !tty {
                    println!("finished: {detail}");
                }
            }
        }
        if tty {
            // Redraw the block of step lines in place.
            let mut out = std::io::stdout().lock();
            if drawn > 0 {
                let _ = write!(out, "\x1b[{drawn}A");
            }
            for (name, l) in &steps {
                let elapsed = l.since.map(|s| s.elapsed()).unwrap_or_default();
                let b = if l.since.is_some() {
                    bar(elapsed, l.deadline)
                } else {
                    " ".repeat(22)
                };
                let _ = writeln!(
                    out,
                    "\x1b[2K  {name:<16} {b} {:<24} {:>7.1} s",
                    l.state,
                    elapsed.as_secs_f64()
                );
            }
            drawn = steps.len();
            let _ = out.flush();
        }
    }
    Ok(())
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map_or("-".into(), |us| format!("{:.1}", us as f64 / 1000.0))
}

fn print_table(v: &Value) {
    println!(
        "\nexecution {} {}{}",
        v["id"],
        v["status"].as_str().unwrap_or("?"),
        v["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
    println!(
        "  {:<16} {:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>9}",
        "step",
        "status",
        "attempts",
        "target",
        "queue ms",
        "exec ms",
        "total ms",
        "agent",
        "output B"
    );
    for s in v["steps"].as_array().into_iter().flatten() {
        let total = match (s["started_ms"].as_u64(), s["ended_ms"].as_u64()) {
            (Some(a), Some(b)) => b.saturating_sub(a).to_string(),
            _ => "-".into(),
        };
        println!(
            "  {:<16} {:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>9}",
            s["name"].as_str().unwrap_or("?"),
            s["status"].as_str().unwrap_or("?"),
            s["attempts"],
            s["target"].as_str().unwrap_or("-"),
            ms(&s["queue_us"]),
            ms(&s["exec_us"]),
            total,
            s["agent"].as_u64().map_or("-".into(), |a| a.to_string()),
            s["output_bytes"]
                .as_u64()
                .map_or("-".into(), |b| b.to_string()),
        );
    }
}
