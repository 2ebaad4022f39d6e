//! Watching a run: traces reach a real OTLP receiver from the coordinator
//! and both workers (one trace per step, linked parent to child across
//! processes), the Prometheus endpoint is scraped and parsed while the job
//! trains, and `coordinator report` draws a PNG of the finished run.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{eventually, run, spawn_env};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use stride_job::test_hooks::Hook;

const LIMIT: Duration = Duration::from_secs(300);
const STEPS: u64 = 60;

/// One received span with the resource it came from.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    instance: String,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<&any_value::Value> {
        attr(&self.span.attributes, key)
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }

    fn float(&self, key: &str) -> Option<f64> {
        match self.attr(key)? {
            any_value::Value::DoubleValue(f) => Some(*f),
            any_value::Value::IntValue(i) => Some(*i as f64),
            _ => None,
        }
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

/// A minimal OTLP/gRPC trace collector: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.spans.lock().expect("spans");
        for rs in request.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = string(&attrs, "service.name");
            let instance = string(&attrs, "service.instance.id");
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Received {
                        service: service.clone(),
                        instance: instance.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// `GET /metrics` over plain HTTP/1.1; returns (content type, body).
fn scrape(url: &str) -> Option<(String, String)> {
    let addr = url.strip_prefix("http://")?.split('/').next()?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    Some((content_type, body.to_string()))
}

/// The value of a gauge or counter sample named `name`.
fn value(scrape: &prometheus_parse::Scrape, name: &str) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .and_then(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[test]
fn a_run_exports_linked_traces_serves_metrics_and_plots_its_curves() {
    let _turn = crate::common::beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let collector = Collector::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let steps = STEPS.to_string();
    // The job waits after step 39 (past the checkpoint and evaluation of
    // step 20) until the scrape below is done, however fast it trains.
    let release = dir.path().join("scraped");
    let hold = format!("39:{}", release.display());
    let mut coord = spawn_env(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "2",
            "--local",
            "--set",
            &format!("train.max_steps={steps}"),
            "--set",
            "train.eval_interval=20",
            "--set",
            "checkpoint.interval=20",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        dir.path(),
        "coordinator.out",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            (Hook::HoldAfterStep.var(), hold.as_str()),
        ],
    );
    let log = || std::fs::read_to_string(dir.path().join("coordinator.out")).unwrap_or_default();

    // ---- Metrics: scraped and parsed while the job trains. ----
    let addr_file = dir.path().join("runs/tiny/metrics.addr");
    let url = eventually(Duration::from_secs(120), "metrics.addr", || {
        if let Ok(Some(s)) = coord.child.try_wait() {
            panic!(
                "the coordinator exited ({s}) before serving metrics:\n{}",
                log()
            );
        }
        std::fs::read_to_string(&addr_file)
            .ok()
            .map(|s| s.trim().to_string())
    });
    let (content_type, scraped) = eventually(
        LIMIT,
        "a scrape past a checkpoint and an evaluation",
        || {
            if let Ok(Some(s)) = coord.child.try_wait() {
                panic!(
                    "the job ended ({s}) before a scrape saw it mid-run:\n{}",
                    log()
                );
            }
            let (ct, body) = scrape(&url)?;
            let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
                .expect("the exposition parses");
            let ready = value(&parsed, "stride_checkpoint_duration_seconds_count")
                .is_some_and(|n| n >= 1.0)
                && value(&parsed, "stride_val_loss").is_some_and(|v| v > 0.0);
            ready.then_some((ct, parsed))
        },
    );
    std::fs::write(&release, "").expect("release the job");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let step = value(&scraped, "stride_step").expect("stride_step");
    assert!(step >= 20.0 && step <= STEPS as f64, "step {step}");
    assert_eq!(value(&scraped, "stride_max_steps"), Some(STEPS as f64));
    assert_eq!(value(&scraped, "stride_workers_connected"), Some(2.0));
    assert_eq!(value(&scraped, "stride_restarts_total"), Some(0.0));
    let lr = value(&scraped, "stride_lr").expect("stride_lr");
    assert!(lr > 0.0 && lr <= 3e-3, "lr {lr}");
    let loss = value(&scraped, "stride_loss").expect("stride_loss");
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert!(value(&scraped, "stride_tokens_per_second").is_some_and(|t| t > 0.0));
    let ranks: HashSet<String> = scraped
        .samples
        .iter()
        .filter(|s| s.metric == "stride_rank_step_duration_seconds")
        .filter_map(|s| s.labels.get("rank").map(str::to_string))
        .collect();
    assert_eq!(ranks, HashSet::from(["0".to_string(), "1".to_string()]));
    let hist = scraped
        .samples
        .iter()
        .find(|s| s.metric == "stride_step_duration_seconds")
        .expect("the step-time histogram");
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("stride_step_duration_seconds is not a histogram: {hist:?}");
    };
    let inf = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .expect("+Inf bucket");
    assert!(
        inf.count >= step - 1.0,
        "+Inf bucket {} for step {step}",
        inf.count
    );

    let status = coord.wait(LIMIT);
    assert!(status.success(), "{}", log());

    // ---- Traces: every step from the coordinator and both ranks. ----
    let spans = eventually(Duration::from_secs(60), "all step spans", || {
        let got = collector.spans.lock().expect("spans").clone();
        let steps = got.iter().filter(|r| r.span.name == "step").count() as u64;
        (steps >= 3 * STEPS).then_some(got)
    });
    let services: HashSet<(&str, &str)> = spans
        .iter()
        .map(|r| (r.service.as_str(), r.instance.as_str()))
        .collect();
    for want in [
        ("stride-coordinator", "tiny"),
        ("stride-worker", "local-0"),
        ("stride-worker", "local-1"),
    ] {
        assert!(
            services.contains(&want),
            "{want:?} missing from {services:?}"
        );
    }
    // Only Stride's spans: the exporter's gRPC stack does not trace itself.
    let known = [
        "job",
        "step",
        "evaluation",
        "checkpoint",
        "checkpoint_commit",
        "checkpoint_write",
        "form_world",
        "register",
        "assign",
        "forward_backward",
        "allreduce",
        "all_gather",
        "optimizer",
        "restart",
    ];
    for r in &spans {
        assert!(
            known.contains(&r.span.name.as_str()),
            "unexpected span {} from {}",
            r.span.name,
            r.service
        );
    }
    let by_id: HashMap<&[u8], &Received> = spans
        .iter()
        .map(|r| (r.span.span_id.as_slice(), r))
        .collect();
    let parent_of = |r: &Received| by_id.get(r.span.parent_span_id.as_slice()).copied();

    let job = spans
        .iter()
        .find(|r| r.service == "stride-coordinator" && r.span.name == "job")
        .expect("the job span");
    let coordinator_steps: Vec<&Received> = spans
        .iter()
        .filter(|r| r.service == "stride-coordinator" && r.span.name == "step")
        .collect();
    assert_eq!(coordinator_steps.len() as u64, STEPS);
    for c in &coordinator_steps {
        assert!(
            c.span.parent_span_id.is_empty(),
            "a step is the root of its trace"
        );
        assert!(
            c.span.links.iter().any(|l| l.span_id == job.span.span_id),
            "step spans link to the job span"
        );
        assert!(
            c.float("lr").is_some_and(|v| v > 0.0) && c.float("loss").is_some_and(f64::is_finite)
        );
    }
    let mut ranks_per_step: HashMap<i64, HashSet<i64>> = HashMap::new();
    for w in spans
        .iter()
        .filter(|r| r.service == "stride-worker" && r.span.name == "step")
    {
        let parent = parent_of(w).expect("a worker step has a known parent");
        assert_eq!(parent.service, "stride-coordinator");
        assert_eq!(parent.span.name, "step");
        assert_eq!(parent.span.trace_id, w.span.trace_id, "one trace per step");
        let step = w
            .int("step")
            .unwrap_or_else(|| panic!("step attribute: {:?}", w.span.attributes));
        assert_eq!(parent.int("step"), Some(step));
        assert_eq!(
            w.float("lr"),
            parent.float("lr"),
            "the worker ran the coordinator's LR"
        );
        assert!(w.float("loss").is_some_and(f64::is_finite));
        ranks_per_step
            .entry(step)
            .or_default()
            .insert(w.int("rank").expect("rank attribute"));
    }
    assert_eq!(ranks_per_step.len() as u64, STEPS);
    assert!(
        ranks_per_step.values().all(|r| *r == HashSet::from([0, 1])),
        "{ranks_per_step:?}"
    );

    // Inside a worker's step; across processes for evaluation, checkpoints
    // and registration.
    fn named<'a>(spans: &'a [Received], name: &'a str) -> impl Iterator<Item = &'a Received> {
        spans.iter().filter(move |r| r.span.name == name)
    }
    let children = |name: &'static str| named(&spans, name);
    for r in children("allreduce").chain(children("forward_backward")) {
        let p = parent_of(r).expect("parent");
        assert_eq!(
            (p.service.as_str(), p.span.name.as_str()),
            ("stride-worker", "step")
        );
        assert_eq!(p.instance, r.instance);
    }
    let expect_parent = |child: &'static str, service: &str, parent: &str, parent_service: &str| {
        let found: Vec<&Received> = children(child).filter(|r| r.service == service).collect();
        assert!(!found.is_empty(), "no {child} span from {service}");
        for r in found {
            let p = parent_of(r)
                .unwrap_or_else(|| panic!("{child} from {service} has no known parent"));
            assert_eq!(
                (p.span.name.as_str(), p.service.as_str()),
                (parent, parent_service),
                "parent of {child}"
            );
            assert_eq!(p.span.trace_id, r.span.trace_id);
        }
    };
    expect_parent(
        "evaluation",
        "stride-coordinator",
        "step",
        "stride-coordinator",
    );
    expect_parent(
        "evaluation",
        "stride-worker",
        "evaluation",
        "stride-coordinator",
    );
    expect_parent(
        "checkpoint",
        "stride-coordinator",
        "step",
        "stride-coordinator",
    );
    expect_parent(
        "checkpoint_commit",
        "stride-coordinator",
        "checkpoint",
        "stride-coordinator",
    );
    expect_parent(
        "checkpoint_write",
        "stride-worker",
        "checkpoint",
        "stride-coordinator",
    );
    expect_parent(
        "register",
        "stride-coordinator",
        "register",
        "stride-worker",
    );
    expect_parent(
        "assign",
        "stride-worker",
        "form_world",
        "stride-coordinator",
    );
    // The rank is on every worker span but `register` (given before ranks are).
    for r in spans
        .iter()
        .filter(|r| r.service == "stride-worker" && r.span.name != "register")
    {
        assert!(r.int("rank").is_some(), "{} without a rank", r.span.name);
    }

    // ---- Report: a PNG of the finished run. ----
    let (status, out) = run(
        &[
            "report",
            "runs/tiny",
            "--out",
            "plot.png",
            "--width",
            "900",
            "--height",
            "500",
        ],
        dir.path(),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{out}");
    assert!(out.contains(&format!("steps 0–{}", STEPS - 1)), "{out}");
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(dir.path().join("plot.png")).expect("plot.png"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
    let frame = reader.next_frame(&mut pixels).expect("decodes");
    assert_eq!((frame.width, frame.height), (900, 500));
    assert_eq!(frame.color_type, png::ColorType::Rgb);
    let colours: HashSet<&[u8]> = pixels[..frame.buffer_size()].chunks(3).collect();
    for (name, rgb) in [
        ("train loss", [31, 119, 180]),
        ("val loss", [214, 39, 40]),
        ("lr", [44, 160, 44]),
    ] {
        assert!(colours.contains(&rgb[..]), "no {name} curve in the picture");
    }
}
