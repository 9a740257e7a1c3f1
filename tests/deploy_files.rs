//! The deployment files under `deploy/` agree with the gateway and with each other.
//!
//! Every YAML and JSON file parses; the ports, probe paths and config paths that the Dockerfile,
//! compose file, Kubernetes manifests and systemd unit hard-code are the ones their gateway
//! configs use; alert rules and the dashboard name only metrics the gateway exports; and every
//! gateway config under `deploy/` passes `breakwater check`.
//!
//! Plain std, serde_yaml and serde_json: no cluster, Docker daemon, systemd or Prometheus needed.

use serde_yaml::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every metric name the gateway exports, without the `_bucket`/`_sum`/`_count` series suffixes
/// of histograms. It must follow `src/ops/metrics.rs` (and the README's metrics table): when a
/// metric is added, renamed or removed there, change it here too, so that the alerts and the
/// dashboard cannot silently query a metric that does not exist.
const KNOWN_METRICS: &[&str] = &[
    "breakwater_requests_total",
    "breakwater_request_duration_seconds",
    "breakwater_upstream_duration_seconds",
    "breakwater_requests_in_flight",
    "breakwater_tunnels_active",
    "breakwater_upstream_errors_total",
    "breakwater_upstream_healthy",
    "breakwater_circuit_state",
    "breakwater_circuit_transitions_total",
    "breakwater_circuit_rejected_total",
    "breakwater_retries_total",
    "breakwater_build_info",
    // Being added with hot reload, caching, auth, rate limiting and Redis.
    "breakwater_config_reloads_total",
    "breakwater_cache_requests_total",
    "breakwater_auth_failures_total",
    "breakwater_ratelimit_rejected_total",
    "breakwater_redis_errors_total",
    "breakwater_redis_up",
    // Tracing (ops::tracing).
    "breakwater_trace_spans_dropped_total",
    "breakwater_trace_spans_exported_total",
    "breakwater_jwt_signature_checks_total",
    "breakwater_jwt_verified_cache_total",
    "breakwater_jwks_refresh_total",
    // Response compression (edge::compression).
    "breakwater_compressed_responses_total",
    "breakwater_compression_input_bytes_total",
    "breakwater_compression_output_bytes_total",
];

/// The alerts that `deploy/prometheus/alerts.yml` must define.
const REQUIRED_ALERTS: &[&str] = &[
    "BreakwaterCircuitOpen",
    "BreakwaterHigh5xxRatio",
    "BreakwaterUpstreamUnhealthy",
    "BreakwaterReloadFailed",
    "BreakwaterDown",
];

// ---------------------------------------------------------------------------------------------
// Reading the files

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.contains(&e))
}

/// A file under `deploy/`, by its path relative to it.
fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a (possibly multi-document) YAML text; empty documents are skipped.
fn yaml_docs(text: &str, what: &str) -> Vec<Yaml> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut value = <Yaml as serde::Deserialize>::deserialize(doc)
            .unwrap_or_else(|e| panic!("{what}: YAML document {i} does not parse: {e}"));
        // Compose files use `<<: *anchor` merge keys.
        value
            .apply_merge()
            .unwrap_or_else(|e| panic!("{what}: YAML document {i}: bad merge key: {e}"));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

/// A single-document YAML file under `deploy/`.
fn yaml_file(rel: &str) -> Yaml {
    let mut docs = yaml_docs(&read(rel), rel);
    assert_eq!(docs.len(), 1, "{rel}: expected exactly one YAML document");
    docs.remove(0)
}

fn str_of<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn seq_of<'a>(v: &'a Yaml, what: &str) -> &'a [Yaml] {
    v.as_sequence()
        .map(|s| s.as_slice())
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

/// A scalar as text: ports and numbers are written both quoted and unquoted.
fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Seconds in a duration as the gateway config writes it: `500ms`, `10s`, `1m`.
fn seconds(text: &str) -> f64 {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    number
        .trim()
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("cannot read duration {text:?}"))
        * scale
}

// ---------------------------------------------------------------------------------------------
// Gateway configs

/// What the deployment files must agree on in a gateway config. Defaults as in
/// src/config/schema.rs and the feature sections it composes.
#[derive(Debug)]
struct GatewayFacts {
    /// Ports of `server.listen` (default 8080).
    proxy_ports: BTreeSet<u16>,
    /// Port of `admin.listen` (default 9090).
    admin_port: u16,
    /// `server.grace_period` in seconds (default 10).
    grace_period: f64,
    upgrade_sock: Option<String>,
    pid_file: Option<String>,
}

fn listen_port(addr: &str, what: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{what}: {addr:?} is not ip:port: {e}"))
        .port()
}

fn gateway_facts(config: &Yaml, what: &str) -> GatewayFacts {
    let server = &config["server"];
    let proxy_ports = match &server["listen"] {
        Yaml::Null => BTreeSet::from([8080]),
        list => seq_of(list, what)
            .iter()
            .map(|a| listen_port(str_of(a, what), what))
            .collect(),
    };
    let admin_port = match &config["admin"]["listen"] {
        Yaml::Null => 9090,
        a => listen_port(str_of(a, what), what),
    };
    let grace_period = match &server["grace_period"] {
        Yaml::Null => 10.0,
        g => seconds(str_of(g, what)),
    };
    GatewayFacts {
        proxy_ports,
        admin_port,
        grace_period,
        upgrade_sock: server["upgrade_sock"].as_str().map(String::from),
        pid_file: server["pid_file"].as_str().map(String::from),
    }
}

/// The `host:port` of every upstream of every service.
fn upstream_addrs(config: &Yaml) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(services) = config["services"].as_mapping() {
        for service in services.values() {
            for u in service["upstreams"].as_sequence().into_iter().flatten() {
                let addr = match u {
                    Yaml::String(s) => Some(s.clone()),
                    other => other["addr"].as_str().map(String::from),
                };
                out.extend(addr);
            }
        }
    }
    out
}

/// The host part of `host:port` when it is a name rather than an IP address.
fn host_name(addr: &str) -> Option<&str> {
    let (host, _) = addr.rsplit_once(':')?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        None
    } else {
        Some(host)
    }
}

/// A copy of `config` whose upstream host names are replaced by loopback addresses, one per
/// distinct name (127.0.0.2, 127.0.0.3, ...), so that no two upstreams collapse into one.
fn with_loopback_upstreams(config: &Yaml) -> Yaml {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for addr in upstream_addrs(config) {
        if let Some(host) = host_name(&addr) {
            let next = format!("127.0.0.{}", names.len() + 2);
            names.entry(host.to_string()).or_insert(next);
        }
    }
    let rewrite = |addr: &str| -> String {
        match host_name(addr) {
            Some(host) => {
                let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
                format!("{}:{port}", names[host])
            }
            None => addr.to_string(),
        }
    };
    let mut copy = config.clone();
    if let Some(services) = copy["services"].as_mapping_mut() {
        for service in services.values_mut() {
            if let Some(list) = service["upstreams"].as_sequence_mut() {
                for u in list {
                    match u {
                        Yaml::String(s) => *s = rewrite(s),
                        Yaml::Mapping(m) => {
                            if let Some(Yaml::String(s)) = m.get_mut("addr") {
                                *s = rewrite(s);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    copy
}

/// Runs `breakwater check -c` on a gateway config given as text.
///
/// Upstream host names are resolved when a config loads, and the names the container and
/// Kubernetes configs use (`users:3001`, the compose/Kubernetes service names) do not resolve
/// on a build machine. Such configs are checked as a copy whose host names are replaced by
/// loopback addresses: everything but name resolution is still validated.
fn assert_check_passes(text: &str, what: &str) {
    let config = yaml_docs(text, what).pop().unwrap_or(Yaml::Null);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy_files");
    std::fs::create_dir_all(&dir).expect("create the temporary directory");
    let needs_copy = upstream_addrs(&config)
        .iter()
        .any(|a| host_name(a).is_some())
        || config["admin"]["token_file"].is_string();
    let checked_text = if needs_copy {
        let mut copy = with_loopback_upstreams(&config);
        // The admin token is mounted from a Secret at run time: check with a stand-in file.
        if copy["admin"]["token_file"].is_string() {
            let token = dir.join(format!("admin-token-{}", std::process::id()));
            std::fs::write(&token, "stand-in-admin-token-0123456789\n").expect("write token");
            copy["admin"]["token_file"] = Yaml::String(token.display().to_string());
        }
        serde_yaml::to_string(&copy).expect("serialise YAML")
    } else {
        text.to_string()
    };
    let file = dir.join(format!(
        "{}-{}.yaml",
        what.replace(['/', ' ', ':', '.'], "_"),
        std::process::id()
    ));
    std::fs::write(&file, &checked_text).expect("write the config copy");
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("check")
        .arg("-c")
        .arg(&file)
        .output()
        .expect("run breakwater check");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "`breakwater check` rejects {what}{} (status {:?}):\n{}{}\n--- checked text ---\n{checked_text}",
        if needs_copy {
            " (upstream host names replaced by loopback addresses, admin.token_file by a stand-in)"
        } else {
            ""
        },
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

// ---------------------------------------------------------------------------------------------
// Metric names

/// `breakwater_*` metric names in `text`, with histogram series suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "breakwater_";
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(pos) = text[from..].find(PREFIX) {
        let start = from + pos;
        from = start + PREFIX.len();
        let preceded_by_word = start > 0 && {
            let b = bytes[start - 1];
            b.is_ascii_alphanumeric() || b == b'_'
        };
        if preceded_by_word {
            continue;
        }
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |n| start + n);
        let name = &text[start..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(name.to_string());
        from = end;
    }
    names
}

fn assert_known_metrics(names: &BTreeSet<String>, what: &str) {
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| !KNOWN_METRICS.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what} names metrics the gateway does not export: {unknown:?} (known: KNOWN_METRICS, \
         which follows src/ops/metrics.rs)"
    );
}

#[test]
fn metric_names_are_extracted_without_series_suffixes() {
    let names = metric_names(
        "histogram_quantile(0.9, rate(breakwater_request_duration_seconds_bucket[5m])) \
         / x_breakwater_not_a_metric + breakwater_requests_total{status=~\"5..\"}",
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "breakwater_request_duration_seconds".to_string(),
            "breakwater_requests_total".to_string()
        ])
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let files = files_under(&deploy_dir());
    let mut yaml_files = 0;
    let mut json_files = 0;
    for path in &files {
        let what = path.display().to_string();
        if has_extension(path, &["yaml", "yml"]) {
            let text = std::fs::read_to_string(path).expect("read YAML file");
            assert!(
                !yaml_docs(&text, &what).is_empty(),
                "{what}: holds no YAML document"
            );
            yaml_files += 1;
        } else if has_extension(path, &["json"]) {
            let text = std::fs::read_to_string(path).expect("read JSON file");
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("{what}: JSON does not parse: {e}"));
            json_files += 1;
        }
    }
    for required in [
        "docker/Dockerfile",
        "docker/gateway.yaml",
        "docker/docker-compose.yml",
        "kubernetes/configmap.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/service.yaml",
        "kubernetes/hpa.yaml",
        "kubernetes/pdb.yaml",
        "kubernetes/redis.yaml",
        "kubernetes/kustomization.yaml",
        "systemd/breakwater.service",
        "systemd/gateway.yaml",
        "prometheus/alerts.yml",
        "prometheus/prometheus.yml",
        "grafana/breakwater.json",
    ] {
        assert!(
            deploy_dir().join(required).is_file(),
            "deploy/{required} is missing"
        );
    }
    assert!(
        yaml_files >= 12,
        "only {yaml_files} YAML files under deploy/"
    );
    assert!(json_files >= 1, "no JSON file under deploy/");
}

/// All Kubernetes objects of `deploy/kubernetes/` (except the kustomization) by kind and name.
fn kubernetes_objects() -> BTreeMap<(String, String), Yaml> {
    let mut objects = BTreeMap::new();
    for path in files_under(&deploy_dir().join("kubernetes")) {
        if !has_extension(&path, &["yaml", "yml"]) || path.ends_with("kustomization.yaml") {
            continue;
        }
        let what = path.display().to_string();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        for doc in yaml_docs(&text, &what) {
            let kind = str_of(&doc["kind"], &format!("{what}: kind")).to_string();
            let name =
                str_of(&doc["metadata"]["name"], &format!("{what}: metadata.name")).to_string();
            assert!(
                doc["metadata"]["namespace"].is_null(),
                "{what}: {kind}/{name} sets a namespace; the manifests are namespace-less"
            );
            let key = (kind.clone(), name.clone());
            assert!(
                objects.insert(key, doc).is_none(),
                "{what}: {kind}/{name} is defined twice"
            );
        }
    }
    objects
}

fn object<'a>(objects: &'a BTreeMap<(String, String), Yaml>, kind: &str, name: &str) -> &'a Yaml {
    objects
        .get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("deploy/kubernetes has no {kind}/{name}"))
}

/// Whether every `selector` label has the same value in `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let Some(selector) = selector.as_mapping() else {
        return false;
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_probes_ports_and_config_match_the_configmap() {
    let objects = kubernetes_objects();
    let deployment = object(&objects, "Deployment", "breakwater");
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert!(
        selects(&deployment["spec"]["selector"]["matchLabels"], pod_labels),
        "the Deployment's selector does not match its pod labels"
    );
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    assert!(
        replicas >= 3,
        "the Deployment runs {replicas} replicas, expected 3"
    );

    let containers = seq_of(&pod["spec"]["containers"], "Deployment containers");
    let container = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("breakwater"))
        .expect("a container named breakwater");

    // The config file the container is told to read is a key of the ConfigMap mounted there.
    let args: Vec<&str> = seq_of(&container["args"], "container args")
        .iter()
        .map(|a| str_of(a, "container arg"))
        .collect();
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "-c" || w[0] == "--config")
        .map(|w| Path::new(w[1]))
        .expect("container args pass `-c FILE`");
    let config_dir = config_path.parent().expect("config path has a directory");
    let mount = seq_of(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| {
            let at = m["mountPath"].as_str().map(Path::new);
            at == Some(config_path) || at == Some(config_dir)
        })
        .unwrap_or_else(|| panic!("nothing is mounted at {}", config_path.display()));
    // The gateway hot-reloads a changed config file by starting a new process and letting the
    // old one exit (src/ops/reload.rs). In a container the old one is PID 1, so an in-place
    // ConfigMap update would restart every replica at once: the file is mounted with subPath,
    // which Kubernetes never updates, and changes roll out as a rolling restart.
    let config_key = mount["subPath"].as_str().unwrap_or_else(|| {
        panic!(
            "mount the config file with subPath, so that it never changes under a running gateway"
        )
    });
    assert_eq!(
        mount["mountPath"].as_str().map(Path::new),
        Some(config_path),
        "the config file must be mounted at the path the container args name"
    );
    let volume_name = str_of(&mount["name"], "volumeMount name");
    let volume = seq_of(&pod["spec"]["volumes"], "volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(volume_name))
        .unwrap_or_else(|| panic!("no volume named {volume_name}"));
    let configmap_name = str_of(
        &volume["configMap"]["name"],
        "config volume's configMap.name",
    );
    let configmap = object(&objects, "ConfigMap", configmap_name);
    let gateway_text = str_of(
        &configmap["data"][config_key],
        &format!("ConfigMap {configmap_name} data.{config_key}"),
    );
    let gateway = yaml_docs(gateway_text, "the ConfigMap's gateway.yaml").remove(0);
    let facts = gateway_facts(&gateway, "the ConfigMap's gateway.yaml");

    // Container ports are exactly the gateway's listeners.
    let ports: BTreeMap<String, u16> = seq_of(&container["ports"], "container ports")
        .iter()
        .map(|p| {
            let number = p["containerPort"].as_u64().expect("containerPort") as u16;
            let name = p["name"].as_str().map_or(number.to_string(), String::from);
            (name, number)
        })
        .collect();
    let port_numbers: BTreeSet<u16> = ports.values().copied().collect();
    let mut expected: BTreeSet<u16> = facts.proxy_ports.clone();
    expected.insert(facts.admin_port);
    assert_eq!(
        port_numbers, expected,
        "container ports {ports:?} differ from gateway.yaml's server.listen and admin.listen"
    );
    // A port given by name or by number, as a container port number.
    let resolve = |port: &Yaml, what: &str| -> u16 {
        let text = scalar(port).unwrap_or_else(|| panic!("{what}: no port"));
        match text.parse::<u16>() {
            Ok(n) => n,
            Err(_) => *ports
                .get(&text)
                .unwrap_or_else(|| panic!("{what}: no container port named {text:?}")),
        }
    };

    for (probe, path) in [("livenessProbe", "/health"), ("readinessProbe", "/ready")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} must GET {path}");
        assert_eq!(
            resolve(&get["port"], probe),
            facts.admin_port,
            "{probe} must probe the admin port (admin.listen)"
        );
    }

    // Shutdown: preStop sleep, then Pingora's grace period and shutdown timeout (grace + 5s),
    // all inside terminationGracePeriodSeconds.
    let pre_stop: Vec<String> = seq_of(
        &container["lifecycle"]["preStop"]["exec"]["command"],
        "preStop exec command",
    )
    .iter()
    .filter_map(scalar)
    .collect();
    assert_eq!(pre_stop.first().map(String::as_str), Some("sleep"));
    let pre_stop_sleep = seconds(pre_stop.get(1).expect("sleep duration"));
    let termination = pod["spec"]["terminationGracePeriodSeconds"]
        .as_f64()
        .expect("terminationGracePeriodSeconds");
    let needed = pre_stop_sleep + facts.grace_period + facts.grace_period + 5.0;
    assert!(
        termination > needed,
        "terminationGracePeriodSeconds {termination} must exceed preStop + grace_period + \
         shutdown timeout = {needed}"
    );

    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    let run_as_non_root = security["runAsNonRoot"].as_bool() == Some(true)
        || pod["spec"]["securityContext"]["runAsNonRoot"].as_bool() == Some(true);
    assert!(run_as_non_root, "the gateway must run as non-root");
    assert!(
        seq_of(&security["capabilities"]["drop"], "capabilities.drop")
            .iter()
            .any(|c| c.as_str() == Some("ALL")),
        "drop ALL capabilities"
    );
    assert!(
        !container["resources"]["requests"]["cpu"].is_null(),
        "a CPU request (the HPA scales on it)"
    );
    assert!(
        !container["resources"]["limits"]["memory"].is_null(),
        "a memory limit"
    );
    // With a read-only root filesystem, the upgrade socket and pid file need a writable mount.
    for file in [&facts.upgrade_sock, &facts.pid_file].into_iter().flatten() {
        let writable = seq_of(&container["volumeMounts"], "volumeMounts")
            .iter()
            .filter(|m| m["readOnly"].as_bool() != Some(true))
            .filter_map(|m| m["mountPath"].as_str())
            .any(|dir| Path::new(file).starts_with(dir));
        assert!(writable, "{file} is not on a writable volume");
    }

    // The Service routes to container ports of these pods.
    let service = object(&objects, "Service", "breakwater");
    assert!(
        selects(&service["spec"]["selector"], pod_labels),
        "the Service's selector does not match the gateway pods"
    );
    let service_targets: BTreeSet<u16> = seq_of(&service["spec"]["ports"], "Service ports")
        .iter()
        .map(|p| {
            let target = if p["targetPort"].is_null() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            resolve(target, "Service targetPort")
        })
        .collect();
    assert!(
        service_targets.contains(&facts.admin_port)
            && facts
                .proxy_ports
                .iter()
                .any(|p| service_targets.contains(p)),
        "the Service must expose the proxy and admin (metrics) ports, targets {service_targets:?}"
    );

    // The HPA scales this Deployment; the PDB covers these pods and leaves room to evict one.
    let hpa = object(&objects, "HorizontalPodAutoscaler", "breakwater");
    assert_eq!(
        str_of(&hpa["apiVersion"], "HPA apiVersion"),
        "autoscaling/v2"
    );
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["kind"].as_str(),
        Some("Deployment")
    );
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("breakwater")
    );
    let min = hpa["spec"]["minReplicas"].as_u64().expect("minReplicas");
    let pdb = object(&objects, "PodDisruptionBudget", "breakwater");
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels),
        "the PDB's selector does not match the gateway pods"
    );
    let min_available = pdb["spec"]["minAvailable"].as_u64().expect("minAvailable");
    assert!(
        min_available < min.min(replicas),
        "PDB minAvailable {min_available} would block every eviction at {} replicas",
        min.min(replicas)
    );

    // Redis is reachable under the name the gateway configs use, and only selects Redis pods.
    let redis = object(&objects, "Service", "redis");
    let redis_deployment = object(&objects, "Deployment", "redis");
    let redis_labels = &redis_deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&redis["spec"]["selector"], redis_labels));
    assert!(
        !selects(&service["spec"]["selector"], redis_labels),
        "the gateway Service would also select the Redis pods"
    );
}

/// The admin listener of the Kubernetes config is reachable in the cluster, so its writes
/// must need the admin token, and the token must come from a Secret the Deployment mounts
/// where `admin.token_file` points (or an env var from a Secret, for `token_env`). Probes and
/// the metrics scrape use read-only paths, which need no token.
#[test]
fn kubernetes_admin_writes_need_a_token_from_a_secret() {
    let objects = kubernetes_objects();
    let configmap = object(&objects, "ConfigMap", "breakwater-config");
    let config = yaml_docs(
        str_of(&configmap["data"]["gateway.yaml"], "gateway.yaml"),
        "configmap gateway.yaml",
    )
    .pop()
    .unwrap();
    let listen = str_of(&config["admin"]["listen"], "admin.listen");
    let ip: IpAddr = listen
        .parse::<SocketAddr>()
        .expect("admin.listen is ip:port")
        .ip();
    assert!(
        !ip.is_loopback(),
        "the kubelet cannot probe a loopback admin listener"
    );
    let deployment = object(&objects, "Deployment", "breakwater");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &seq_of(&pod["containers"], "containers")[0];
    let volumes = seq_of(&pod["volumes"], "volumes");
    let mounts = seq_of(&container["volumeMounts"], "volumeMounts");
    match (
        &config["admin"]["token_file"],
        &config["admin"]["token_env"],
    ) {
        (Yaml::String(file), _) => {
            let file = Path::new(file);
            let (dir, name) = (file.parent().unwrap(), file.file_name().unwrap());
            let mount = mounts
                .iter()
                .find(|m| Path::new(str_of(&m["mountPath"], "mountPath")) == dir)
                .unwrap_or_else(|| panic!("nothing is mounted at {}", dir.display()));
            let volume_name = str_of(&mount["name"], "volume name");
            let volume = volumes
                .iter()
                .find(|v| str_of(&v["name"], "volume name") == volume_name)
                .unwrap_or_else(|| panic!("no volume {volume_name}"));
            let secret = &volume["secret"];
            assert!(
                secret["secretName"].is_string(),
                "the admin token volume must be a Secret: {volume:?}"
            );
            let items = seq_of(&secret["items"], "secret items");
            assert!(
                items
                    .iter()
                    .any(|i| Path::new(str_of(&i["path"], "item path")) == Path::new(name)),
                "the Secret does not provide {}: {items:?}",
                name.to_string_lossy()
            );
            assert_eq!(mount["readOnly"], Yaml::Bool(true));
        }
        (_, Yaml::String(var)) => {
            let env = seq_of(&container["env"], "env");
            let entry = env
                .iter()
                .find(|e| str_of(&e["name"], "env name") == var)
                .unwrap_or_else(|| panic!("the container does not set {var}"));
            assert!(
                entry["valueFrom"]["secretKeyRef"].is_mapping(),
                "{var} must come from a Secret: {entry:?}"
            );
        }
        _ => panic!(
            "the admin listener is on {listen} without admin.token_file or admin.token_env: \
             its writes would be refused, and the token should come from a Secret"
        ),
    }
    // What the cluster reaches without a token is read-only.
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = str_of(&container[probe]["httpGet"]["path"], probe);
        assert!(["/health", "/ready"].contains(&path), "{probe} {path}");
    }
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        str_of(&annotations["prometheus.io/path"], "scrape path"),
        "/metrics"
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let kustomization = yaml_file("kubernetes/kustomization.yaml");
    let listed: BTreeSet<String> = seq_of(&kustomization["resources"], "resources")
        .iter()
        .map(|r| str_of(r, "resource").to_string())
        .collect();
    let present: BTreeSet<String> = files_under(&deploy_dir().join("kubernetes"))
        .iter()
        .filter(|p| has_extension(p, &["yaml", "yml"]) && !p.ends_with("kustomization.yaml"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs the files beside it"
    );
}

/// The Dockerfile's instructions of its last stage, continuation lines joined: (INSTRUCTION, rest).
fn dockerfile_final_stage(text: &str) -> Vec<(String, String)> {
    let mut instructions = dockerfile_instructions(text);
    let last_from = instructions
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("the Dockerfile has a FROM");
    instructions.split_off(last_from)
}

/// Every instruction of the Dockerfile, continuation lines joined: (INSTRUCTION, rest).
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                instructions.push((word.to_ascii_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    instructions
}

/// A file of the repository, by its path relative to the repository's root.
fn read_repo(rel: &str) -> String {
    let path = deploy_dir().join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The repository's `Cargo.toml`.
fn manifest() -> String {
    read_repo("Cargo.toml")
}

/// The crates `Cargo.toml` takes from the repository instead of crates.io
/// (`[patch.crates-io]`), by path.
fn patched_crate_paths() -> Vec<String> {
    let manifest = manifest();
    let section = manifest
        .split("\n[patch.crates-io]\n")
        .nth(1)
        .map(|rest| rest.split("\n[").next().unwrap_or(rest))
        .unwrap_or_default();
    section
        .lines()
        .filter_map(|line| line.split_once("path = \"")?.1.split_once('"'))
        .map(|(path, _)| path.to_string())
        .collect()
}

/// The workspace's member crates other than the root one, by path (`members = [...]`).
fn workspace_member_paths() -> Vec<String> {
    let manifest = manifest();
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("Cargo.toml lists its workspace members");
    line.split('"')
        .skip(1)
        .step_by(2)
        .filter(|m| *m != ".")
        .map(str::to_string)
        .collect()
}

/// What every cargo build of the workspace reads besides the sources: the manifests, the lock
/// file, the patched crates, the repository's cargo settings, and the benches' directory when
/// `Cargo.toml` declares any (cargo refuses a manifest whose declared targets have no file).
fn what_cargo_reads_first() -> Vec<String> {
    let mut paths = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    paths.extend(patched_crate_paths());
    if deploy_dir().join("../.cargo/config.toml").exists() {
        paths.push(".cargo/config.toml".to_string());
    }
    if manifest().contains("\n[[bench]]\n") {
        paths.push("benches".to_string());
    }
    for member in workspace_member_paths() {
        paths.push(format!("{member}/Cargo.toml"));
    }
    paths
}

/// The instructions of the Dockerfile's stage `name` (`FROM ... AS name` up to the next FROM).
fn dockerfile_stage(text: &str, name: &str) -> Vec<(String, String)> {
    let instructions = dockerfile_instructions(text);
    let start = instructions
        .iter()
        .position(|(i, rest)| i == "FROM" && rest.split_whitespace().last() == Some(name))
        .unwrap_or_else(|| panic!("the Dockerfile has no stage named {name}"));
    let end = instructions[start + 1..]
        .iter()
        .position(|(i, _)| i == "FROM")
        .map_or(instructions.len(), |n| start + 1 + n);
    instructions[start..end].to_vec()
}

/// Whether one of the COPY instructions brings the repository's `path` in from the build
/// context: the path itself or a directory holding it.
fn copies(instructions: &[(String, String)], path: &str) -> bool {
    instructions
        .iter()
        .filter(|(i, rest)| i == "COPY" && !rest.contains("--from"))
        .any(|(_, rest)| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            words[..words.len().saturating_sub(1)].iter().any(|src| {
                let src = src.trim_end_matches('/');
                path == src || path.starts_with(&format!("{src}/"))
            })
        })
}

/// Whether the allow-list beside the Dockerfile lets the repository's `path` into the build
/// context: a `!` line naming it or a directory holding it.
fn context_lets_in(ignore: &str, path: &str) -> bool {
    ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .any(|allowed| {
            let allowed = allowed.trim_end_matches('/');
            path == allowed || path.starts_with(&format!("{allowed}/"))
        })
}

/// Asserts that each of the repository's `paths` is in the build context and copied by one of
/// `instructions` (a stage's, up to the step named `before`).
fn assert_brought_in(instructions: &[(String, String)], paths: &[String], before: &str) {
    let ignore = read("docker/Dockerfile.dockerignore");
    for path in paths {
        assert!(
            copies(instructions, path),
            "the Dockerfile does not COPY {path} before {before}"
        );
        assert!(
            context_lets_in(&ignore, path),
            "Dockerfile.dockerignore does not let {path} into the build context"
        );
    }
}

#[test]
fn docker_dist_build_copies_what_cargo_reads_before_building_dependencies() {
    assert!(
        !patched_crate_paths().is_empty(),
        "Cargo.toml's [patch.crates-io] names no path: did its shape change?"
    );
    let stage = dockerfile_stage(&read("docker/Dockerfile"), "builder-dist");
    let first_build = stage
        .iter()
        .position(|(i, rest)| i == "RUN" && rest.contains("cargo build"))
        .expect("the dist stage runs cargo build");
    assert_brought_in(
        &stage[..first_build],
        &what_cargo_reads_first(),
        "the dist stage's first cargo build (cargo reads it)",
    );
}

#[test]
fn docker_image_is_profile_guided_by_default_and_its_stage_copies_what_the_training_reads() {
    let text = read("docker/Dockerfile");
    let instructions = dockerfile_instructions(&text);
    assert!(
        instructions
            .iter()
            .any(|(i, rest)| i == "ARG" && rest == "BUILD=pgo"),
        "the Dockerfile's default BUILD is not pgo"
    );
    let chosen = dockerfile_stage(&text, "builder");
    assert_eq!(
        chosen[0].1, "builder-${BUILD} AS builder",
        "the builder stage the runtime copies from is not the one BUILD names"
    );
    assert!(
        copies_from_builder(&dockerfile_final_stage(&text)),
        "the runtime stage does not COPY the binaries from the builder stage"
    );

    let stage = dockerfile_stage(&text, "builder-pgo");
    let build = stage
        .iter()
        .position(|(i, rest)| i == "RUN" && rest.starts_with("scripts/build-pgo"))
        .expect("the pgo stage runs scripts/build-pgo");
    // The builds (both: the instrumented one and the optimised one) read what any build does
    // plus every target's sources, including bare Pingora's example that the training runs;
    // the training runs loadtest/bench.sh, and build-pgo calls scripts/install-deps.
    let mut needed = what_cargo_reads_first();
    needed.extend(["src", "examples", "scripts", "loadtest"].map(String::from));
    needed.extend(workspace_member_paths());
    needed.extend(bench_reads_from_the_repository());
    assert_brought_in(
        &stage[..build],
        &needed,
        "the pgo stage's scripts/build-pgo",
    );
    for script in [
        "scripts/build-pgo",
        "scripts/install-deps",
        "loadtest/bench.sh",
    ] {
        assert!(
            deploy_dir().join("..").join(script).is_file(),
            "the pgo stage runs {script}, which is gone"
        );
    }
    // Where build-pgo writes the optimised binaries, and what the stage installs from.
    let install = &stage[build].1;
    assert!(
        install.contains("target/pgo/$host/release/breakwater")
            && install.contains("target/pgo/$host/release/sample-service"),
        "the pgo stage installs binaries from elsewhere than build-pgo writes them: {install}"
    );
    let script = read_repo("scripts/build-pgo");
    assert!(
        script.contains("OUT=\"target/pgo/$HOST/release\""),
        "scripts/build-pgo no longer writes target/pgo/<host>/release"
    );
}

/// The repository paths loadtest/bench.sh reads outside loadtest/ (`$LT_ROOT/<path>`).
fn bench_reads_from_the_repository() -> Vec<String> {
    let bench = read_repo("loadtest/bench.sh");
    let paths: Vec<String> = bench
        .split("$LT_ROOT/")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "_./-".contains(*c))
                .collect::<String>()
        })
        .filter(|p| !p.is_empty())
        .collect();
    assert!(
        paths.iter().any(|p| p == "tests/fixtures"),
        "loadtest/bench.sh no longer reads the JWT keys from $LT_ROOT/tests/fixtures: {paths:?}"
    );
    paths
}

/// Whether a COPY of the final stage takes the binaries from the `builder` stage.
fn copies_from_builder(stage: &[(String, String)]) -> bool {
    stage.iter().any(|(i, rest)| {
        i == "COPY" && rest.contains("--from=builder ") && rest.contains("/out/breakwater")
    })
}

#[test]
fn dockerfile_exposes_the_listeners_checks_health_and_runs_unprivileged() {
    let facts = gateway_facts(&yaml_file("docker/gateway.yaml"), "docker/gateway.yaml");
    let stage = dockerfile_final_stage(&read("docker/Dockerfile"));
    let all = |name: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, rest)| rest.as_str())
            .collect()
    };

    let exposed: BTreeSet<u16> = all("EXPOSE")
        .iter()
        .flat_map(|rest| rest.split_whitespace())
        .map(|p| {
            p.split('/')
                .next()
                .unwrap()
                .parse::<u16>()
                .expect("EXPOSE port")
        })
        .collect();
    for port in facts.proxy_ports.iter().chain([&facts.admin_port]) {
        assert!(
            exposed.contains(port),
            "the Dockerfile does not EXPOSE {port}"
        );
    }

    let health = all("HEALTHCHECK");
    assert_eq!(health.len(), 1, "one HEALTHCHECK in the runtime stage");
    assert!(
        health[0].contains(&format!("/{}", facts.admin_port))
            || health[0].contains(&format!(":{}", facts.admin_port)),
        "the HEALTHCHECK does not probe the admin port {}: {}",
        facts.admin_port,
        health[0]
    );
    assert!(
        health[0].contains("/health"),
        "the HEALTHCHECK must GET /health"
    );

    let user = *all("USER").last().expect("the runtime stage sets a USER");
    let name = user.split(':').next().unwrap();
    assert!(
        name != "root" && name != "0",
        "the image must not run as root (USER {user})"
    );

    // The image's default config is deploy/docker/gateway.yaml, and the CMD reads it.
    let copied = all("COPY")
        .into_iter()
        .find(|c| c.contains("deploy/docker/gateway.yaml"))
        .expect("the Dockerfile COPYs deploy/docker/gateway.yaml");
    let target = copied.split_whitespace().last().unwrap();
    let cmd = all("CMD").last().copied().expect("a CMD");
    assert!(
        cmd.contains(target),
        "CMD {cmd} does not read the copied config {target}"
    );
    let entrypoint = all("ENTRYPOINT").last().copied().expect("an ENTRYPOINT");
    assert!(entrypoint.contains("breakwater"), "ENTRYPOINT {entrypoint}");

    // The build context is filtered by the allow-list next to the Dockerfile: it must let the
    // files the build copies through.
    let ignore = read("docker/Dockerfile.dockerignore");
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src/",
        "benches/",
        "deploy/docker/gateway.yaml",
    ] {
        assert!(
            ignore.lines().any(|l| l.trim() == format!("!{needed}")),
            "Dockerfile.dockerignore does not let {needed} into the build context"
        );
    }
}

#[test]
fn compose_ports_healthcheck_and_upstreams_match_the_gateway_config() {
    let config = yaml_file("docker/gateway.yaml");
    let facts = gateway_facts(&config, "docker/gateway.yaml");
    let compose = yaml_file("docker/docker-compose.yml");
    let services = &compose["services"];
    let gateway = &services["gateway"];
    assert!(
        gateway.is_mapping(),
        "the compose file has no `gateway` service"
    );

    // The mounted config is docker/gateway.yaml.
    let mounts: Vec<&str> = seq_of(&gateway["volumes"], "gateway volumes")
        .iter()
        .map(|v| str_of(v, "volume"))
        .collect();
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./gateway.yaml:/etc/breakwater/gateway.yaml")),
        "the gateway does not mount ./gateway.yaml at /etc/breakwater/gateway.yaml: {mounts:?}"
    );

    // Published ports: the container side is the gateway's listeners.
    let container_ports: BTreeSet<u16> = seq_of(&gateway["ports"], "gateway ports")
        .iter()
        .map(|p| {
            let text = scalar(p).expect("a port mapping");
            let container = text.rsplit(':').next().unwrap();
            container
                .split('/')
                .next()
                .unwrap()
                .parse()
                .expect("container port")
        })
        .collect();
    let mut expected = facts.proxy_ports.clone();
    expected.insert(facts.admin_port);
    assert_eq!(
        container_ports, expected,
        "published container ports vs gateway.yaml"
    );

    if !gateway["healthcheck"].is_null() {
        let test: Vec<String> = match &gateway["healthcheck"]["test"] {
            Yaml::Sequence(s) => s.iter().filter_map(scalar).collect(),
            other => vec![scalar(other).expect("healthcheck test")],
        };
        let test = test.join(" ");
        assert!(
            test.contains(&format!("/{}", facts.admin_port))
                || test.contains(&format!(":{}", facts.admin_port)),
            "the compose healthcheck does not probe the admin port: {test}"
        );
        assert!(
            test.contains("/health"),
            "the compose healthcheck must GET /health"
        );
    }

    // Each upstream host is a compose service that listens on that port, and the gateway waits
    // for it to start (upstream names are resolved once, at config load).
    let depends_on = &gateway["depends_on"];
    let addrs = upstream_addrs(&config);
    assert!(!addrs.is_empty());
    for addr in addrs {
        let host = host_name(&addr).expect("compose upstreams are service names");
        let port = addr.rsplit_once(':').unwrap().1;
        let service = &services[host];
        assert!(
            service.is_mapping(),
            "upstream {addr}: no compose service {host}"
        );
        let command: Vec<String> = seq_of(&service["command"], &format!("{host} command"))
            .iter()
            .filter_map(scalar)
            .collect();
        assert!(
            command.iter().any(|a| a.ends_with(&format!(":{port}"))),
            "compose service {host} does not listen on port {port}: {command:?}"
        );
        assert_eq!(
            depends_on[host]["condition"].as_str(),
            Some("service_started"),
            "the gateway must depend on {host} with condition service_started"
        );
    }
}

/// `Key=Value` lines of a systemd unit's section, in order (keys may repeat).
fn unit_section(text: &str, section: &str) -> Vec<(String, String)> {
    let header = format!("[{section}]");
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
        } else if inside && !line.starts_with('#') && !line.starts_with(';') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

#[test]
fn systemd_unit_checks_runs_and_reloads_the_config_it_ships_with() {
    let unit = read("systemd/breakwater.service");
    let service = unit_section(&unit, "Service");
    let values = |key: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let config_arg = |command: &str| -> String {
        let words: Vec<&str> = command.split_whitespace().collect();
        let path = words
            .windows(2)
            .find(|w| w[0] == "-c" || w[0] == "--config")
            .map(|w| w[1])
            .unwrap_or_else(|| panic!("`{command}` does not pass -c FILE"));
        assert!(
            path.starts_with('/'),
            "`{command}`: -c needs an absolute path"
        );
        path.to_string()
    };

    let start = values("ExecStart");
    assert_eq!(start.len(), 1, "one ExecStart");
    assert!(start[0].contains("breakwater"), "ExecStart runs breakwater");
    let config_path = config_arg(start[0]);
    assert!(
        values("ExecStartPre")
            .iter()
            .any(|c| c.contains(" check") && config_arg(c) == config_path),
        "ExecStartPre must run `breakwater check -c {config_path}`"
    );
    assert!(
        values("ExecReload")
            .iter()
            .any(|c| c.contains("breakwater reload") && config_arg(c) == config_path),
        "ExecReload must run `breakwater reload -c {config_path}`, which waits for the outcome"
    );
    assert_eq!(values("Restart"), ["on-failure"]);
    // A reload starts a new gateway process that reports itself with sd_notify (MAINPID=,
    // READY=1; src/ops/reload/) before the old main process exits: Type=simple would take that
    // exit for the end of the service.
    assert_eq!(
        values("Type"),
        ["notify"],
        "Type=notify, so reloads keep the unit"
    );
    assert_eq!(
        values("NotifyAccess"),
        ["all"],
        "NotifyAccess=all: the reload's new process is not the main PID when it notifies"
    );

    // deploy/systemd/gateway.yaml is what the unit expects at that path.
    let config = yaml_file("systemd/gateway.yaml");
    let facts = gateway_facts(&config, "systemd/gateway.yaml");
    let stop: f64 = values("TimeoutStopSec")
        .last()
        .map(|t| seconds(t))
        .expect("TimeoutStopSec");
    assert!(
        stop > facts.grace_period * 2.0 + 5.0,
        "TimeoutStopSec {stop}s must exceed grace_period + Pingora's shutdown timeout"
    );
    // ProtectSystem=strict and PrivateTmp: only the RuntimeDirectory is writable and shared.
    let runtime_dir = values("RuntimeDirectory")
        .last()
        .map(|d| format!("/run/{d}/"))
        .expect("RuntimeDirectory");
    for (field, value) in [
        ("upgrade_sock", &facts.upgrade_sock),
        ("pid_file", &facts.pid_file),
    ] {
        let value = value
            .as_deref()
            .unwrap_or_else(|| panic!("systemd/gateway.yaml must set server.{field}"));
        assert!(
            value.starts_with(&runtime_dir),
            "server.{field} {value} must be under the unit's RuntimeDirectory {runtime_dir}"
        );
    }
    assert_eq!(values("ProtectSystem"), ["strict"]);
    assert!(!values("LimitNOFILE").is_empty(), "LimitNOFILE");
}

#[test]
fn alerts_define_the_required_rules_over_known_metrics() {
    let rules_file = yaml_file("prometheus/alerts.yml");
    let mut alerts = BTreeSet::new();
    for group in seq_of(&rules_file["groups"], "groups") {
        for rule in seq_of(&group["rules"], "rules") {
            let name = str_of(&rule["alert"], "alert name").to_string();
            let expr = str_of(&rule["expr"], &format!("{name}: expr"));
            assert_known_metrics(&metric_names(expr), &format!("alert {name}"));
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|s| !s.is_empty()),
                    "alert {name} has no {annotation} annotation"
                );
            }
            assert!(
                rule["labels"]["severity"].is_string(),
                "alert {name} has no severity label"
            );
            assert!(alerts.insert(name.clone()), "alert {name} is defined twice");
        }
    }
    for required in REQUIRED_ALERTS {
        assert!(alerts.contains(*required), "alerts.yml lacks {required}");
    }

    // prometheus.yml loads these rules and scrapes the compose gateway's admin port.
    let prometheus = yaml_file("prometheus/prometheus.yml");
    assert!(
        seq_of(&prometheus["rule_files"], "rule_files")
            .iter()
            .any(|f| f.as_str() == Some("alerts.yml")),
        "prometheus.yml does not load alerts.yml"
    );
    let admin_port =
        gateway_facts(&yaml_file("docker/gateway.yaml"), "docker/gateway.yaml").admin_port;
    let targets: Vec<&str> = seq_of(&prometheus["scrape_configs"], "scrape_configs")
        .iter()
        .flat_map(|job| job["static_configs"].as_sequence().into_iter().flatten())
        .flat_map(|sc| sc["targets"].as_sequence().into_iter().flatten())
        .filter_map(|t| t.as_str())
        .collect();
    assert!(
        targets.contains(&format!("gateway:{admin_port}").as_str()),
        "prometheus.yml does not scrape gateway:{admin_port}: {targets:?}"
    );
}

/// Every string in a JSON value, keys excluded.
fn json_strings<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_strings(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_has_panels_over_known_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/breakwater.json")).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let queries = panels
        .iter()
        .filter(|p| p["type"] != "row")
        .filter(|p| {
            p["targets"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["expr"].is_string()))
        })
        .count();
    assert!(queries >= 10, "only {queries} panels with a query");

    let mut strings = Vec::new();
    json_strings(&dashboard, &mut strings);
    let names: BTreeSet<String> = strings.iter().flat_map(|s| metric_names(s)).collect();
    assert_known_metrics(&names, "grafana/breakwater.json");
    for wanted in [
        "breakwater_requests_total",
        "breakwater_request_duration_seconds",
        "breakwater_circuit_state",
        "breakwater_circuit_rejected_total",
        "breakwater_retries_total",
        "breakwater_upstream_healthy",
        "breakwater_cache_requests_total",
        "breakwater_ratelimit_rejected_total",
        "breakwater_auth_failures_total",
        "breakwater_config_reloads_total",
    ] {
        assert!(
            names.contains(wanted),
            "the dashboard has no panel on {wanted}"
        );
    }

    // The dashboard links to a gateway's live status page (the admin listener's `/status`).
    let links = dashboard["links"].as_array().expect("links");
    assert!(
        links
            .iter()
            .any(|l| l["url"].as_str().is_some_and(|u| u.ends_with("/status"))),
        "the dashboard has no link to the status page: {links:?}"
    );

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    let service = variables
        .iter()
        .find(|v| v["name"] == "service")
        .expect("a `service` template variable");
    assert!(
        service
            .to_string()
            .contains("label_values(breakwater_requests_total, service)"),
        "the service variable lists label_values(breakwater_requests_total, service)"
    );
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(schema >= 36, "schemaVersion {schema}");
}

#[test]
fn gateway_configs_under_deploy_pass_breakwater_check() {
    // Standalone gateway configs: every gateway.yaml under deploy/.
    let mut checked = 0;
    for path in files_under(&deploy_dir()) {
        if path.file_name().and_then(|n| n.to_str()) == Some("gateway.yaml") {
            let rel = path
                .strip_prefix(deploy_dir())
                .unwrap()
                .display()
                .to_string();
            assert_check_passes(&read(&rel), &rel);
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "only {checked} gateway.yaml files under deploy/"
    );

    // Configs embedded in Kubernetes ConfigMaps.
    for ((kind, name), object) in kubernetes_objects() {
        if kind != "ConfigMap" {
            continue;
        }
        for (key, value) in object["data"].as_mapping().into_iter().flatten() {
            let key = str_of(key, "ConfigMap data key");
            if key.ends_with(".yaml") || key.ends_with(".yml") {
                assert_check_passes(
                    str_of(value, key),
                    &format!("kubernetes ConfigMap {name} {key}"),
                );
            }
        }
    }
}
