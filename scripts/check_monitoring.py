#!/usr/bin/env python3
"""The file checks of scripts/check-monitoring.sh (which runs promtool and the gateways first).

    check_monitoring.py METRICS_FILE...
    check_monitoring.py --write-dashboard-rules PATH   the dashboard's queries as a rule file,
                                                       for `promtool check rules`

METRICS_FILE: /metrics as scraped from live gateways (Prometheus text format); the names and
labels they show are the only ones the monitoring files may use. Checks:

- every metric named in the alert rules, their unit tests and the dashboard (panel queries and
  template variables) is one a live gateway exports (a histogram's _bucket/_sum/_count series
  included), a recording rule of the rules file, or `up` (Prometheus's own scrape series);
- every label in their selectors and in by/on/ignoring clauses is one those series carry (or
  `job`/`instance`, which Prometheus adds); the values of `method` and `status` are names the
  gateway uses (Sources/GatewayWire/Method.swift, StatusCode.swift), of `kind` and `reason` ones a
  live gateway shows;
- the dashboard parses and has a panel for each signal that matters (REQUIRED_PANELS);
- docker/docker-compose.yml parses, runs prometheus and grafana from pinned images with the
  files of docker/monitoring/ mounted where prometheus.yml and the provisioning expect them;
- docs/operations.md's alert table names exactly the alerts of the rules file.

Exit status 0 when all hold; otherwise each failure is printed and the status is 1.
"""

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "docker" / "monitoring"
RULES = MONITORING / "hsm-gateway.rules.yml"
RULE_TESTS = MONITORING / "hsm-gateway.rules.test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "hsm-gateway.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "hsm-gateway.yml"
COMPOSE = ROOT / "docker" / "docker-compose.yml"
GATEWAY_COMPOSE_CONFIG = ROOT / "docker" / "gateway.compose.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
METHOD_SWIFT = ROOT / "Sources" / "GatewayWire" / "Method.swift"
STATUS_SWIFT = ROOT / "Sources" / "GatewayWire" / "StatusCode.swift"

# Series Prometheus makes itself for every target, not the gateway.
PROMETHEUS_SERIES = {"up"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Each signal the dashboard must show: (what, a metric its panel queries, a word of its title).
REQUIRED_PANELS = [
    ("readiness", "hsmgw_ready", "ready"),
    ("seal state", "hsmgw_hsm_sealed", "seal"),
    ("requests by status", "hsmgw_requests_total", "requests by status"),
    ("errors by status", "hsmgw_requests_total", "errors by status"),
    ("latency p99", "hsmgw_request_duration_seconds_bucket", "p99"),
    ("HSM session pool", "hsmgw_hsm_sessions_in_use", "HSM session"),
    ("HSM session waiters", "hsmgw_hsm_session_waiters", "HSM session"),
    ("store pool", "hsmgw_store_connections_in_use", "store connections"),
    ("audit commit latency", "hsmgw_audit_commit_duration_seconds_bucket", "audit commit latency"),
    ("shed requests", "hsmgw_requests_total", "shed"),
    ("refused frames", "hsmgw_frames_refused_total", "refused"),
    ("background lease", "hsmgw_background_lease_held", "lease"),
    ("cache invalidations (propagation)", "hsmgw_cache_invalidations_total", "cache invalidations"),
]
PROMQL_KEYWORDS = {
    "and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
# A whole identifier (no backing off to a prefix) not followed by "(" (a function).
IDENTIFIER = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![a-zA-Z0-9_:])(?!\s*\()")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

failures = []


def fail(message):
    failures.append(message)


def load_live(paths):
    """{metric name: {label: set of values}} from scraped /metrics files."""
    live = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            match = SAMPLE.match(line)
            if not match:
                fail(f"{path}: unparsable line {line!r}")
                continue
            labels = live.setdefault(match.group(1), {})
            for name, value in LABEL_PAIR.findall(match.group(3) or ""):
                labels.setdefault(name, set()).add(value)
    return live


def source_names():
    methods = set(re.findall(r'add\(\.\w+, "(\w+)"', METHOD_SWIFT.read_text())) | {"unknown"}
    statuses = set(re.findall(r'case \d+: return "([A-Z_]+)"', STATUS_SWIFT.read_text()))
    if len(methods) < 10 or len(statuses) != 17:
        fail(f"could not read the method or status names from {METHOD_SWIFT} / {STATUS_SWIFT}")
    return methods, statuses


def matcher_values(operator, value):
    """The literal values a matcher names, or None when it is a pattern or a variable."""
    if "$" in value:
        return None
    if operator in ("=", "!="):
        return {value}
    if re.fullmatch(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*", value):
        return set(value.split("|"))
    return None


class Checker:
    def __init__(self, live, recorded, methods, statuses):
        self.live = live
        self.recorded = recorded
        self.allowed_values = {"method": methods, "status": statuses}
        self.all_labels = set(TARGET_LABELS)
        for labels in live.values():
            self.all_labels |= set(labels)
        self.used = set()

    def labels_of(self, metric):
        if metric in self.live:
            return set(self.live[metric]) | TARGET_LABELS
        return None  # recorded or Prometheus's own: labels not known from a scrape

    def check_expr(self, where, expr):
        text = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($__rate_interval, $job)
        # Label names in grouping clauses.
        for _, names in GROUPING.findall(text):
            for name in filter(None, (n.strip() for n in names.split(","))):
                if name not in self.all_labels:
                    fail(f"{where}: label {name!r} in a grouping clause is on no live series")
        text = GROUPING.sub(" ", text)
        # Selectors: metric{matchers}.
        for metric, body in SELECTOR.findall(text):
            self.check_selector(where, metric or None, body)
        text = SELECTOR.sub(lambda m: " " + (m.group(1) or "") + " ", text)
        text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
        text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)  # strings (quantile args are numbers)
        for name in IDENTIFIER.findall(text):
            if name.lower() in PROMQL_KEYWORDS:
                continue
            self.check_metric(where, name)

    def check_metric(self, where, name):
        self.used.add(name)
        if name in self.live or name in self.recorded or name in PROMETHEUS_SERIES:
            return
        fail(f"{where}: metric {name!r} is not exported by a live gateway")

    def check_selector(self, where, metric, body):
        if metric:
            self.check_metric(where, metric)
        labels = self.labels_of(metric) if metric else None
        rest = MATCHER.sub("", body).strip()
        if rest:
            fail(f"{where}: cannot read the matchers {{{body}}}")
        for name, operator, value in MATCHER.findall(body):
            if name == "__name__":
                continue
            if labels is not None and name not in labels:
                fail(f"{where}: {metric} has no label {name!r} on a live gateway")
            elif labels is None and name not in self.all_labels:
                fail(f"{where}: label {name!r} is on no live series")
            values = matcher_values(operator, value)
            if values is None:
                continue
            if name in self.allowed_values:
                allowed = self.allowed_values[name]
            elif name in ("kind", "reason") and metric in self.live:
                allowed = self.live[metric].get(name, set())
            else:
                continue
            for v in sorted(values - allowed):
                fail(f"{where}: {name}={v!r} is not a value the gateway uses for {name}")

    def check_series(self, where, series):
        """A unit test's input series: metric{label="value", ...}."""
        match = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{(.*)\})?\s*", series)
        if not match:
            fail(f"{where}: cannot read the series {series!r}")
            return
        self.check_selector(where, match.group(1), match.group(3) or "")


def rules_exprs(rules):
    exprs, recorded, alerts = [], set(), []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            exprs.append((f"{RULES.name}: {name}", rule["expr"]))
            if "record" in rule:
                recorded.add(rule["record"])
            else:
                alerts.append(rule["alert"])
    return exprs, recorded, alerts


def dashboard_panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def check_dashboard(checker, dashboard):
    queried = {}
    for panel in dashboard_panels(dashboard):
        if panel.get("type") == "row":
            continue
        title = panel.get("title", "")
        targets = panel.get("targets") or []
        if not title or not targets:
            fail(f"{DASHBOARD.name}: panel {panel.get('id')} has no title or no queries")
        for target in targets:
            where = f"{DASHBOARD.name}: panel {title!r}"
            checker.check_expr(where, target["expr"])
            for name in IDENTIFIER.findall(re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", target["expr"])):
                queried.setdefault(name, []).append(title)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        if not match:
            fail(f"{DASHBOARD.name}: variable {variable['name']}: not a label_values(selector, label) query")
            continue
        checker.check_expr(f"{DASHBOARD.name}: variable {variable['name']}", match.group(1))
        if match.group(2) not in checker.all_labels:
            fail(f"{DASHBOARD.name}: variable {variable['name']}: label {match.group(2)!r} is on no live series")
    for what, metric, word in REQUIRED_PANELS:
        if not any(word.lower() in title.lower() for title in queried.get(metric, [])):
            fail(f"{DASHBOARD.name}: no panel shows {what} (a title with {word!r}, querying {metric})")
    return len([p for p in dashboard_panels(dashboard) if p.get("type") != "row"])


def check_compose(prometheus_config, providers, datasources):
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name in ("gateway", "prometheus", "grafana"):
        if name not in services:
            fail(f"{COMPOSE.name}: no service {name!r}")
            return
    for name in ("prometheus", "grafana"):
        image = services[name].get("image", "")
        if not re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image):
            fail(f"{COMPOSE.name}: {name}'s image {image!r} is not pinned to a version")
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                if not (COMPOSE.parent / source).exists():
                    fail(f"{COMPOSE.name}: {name} mounts {source}, which does not exist")
                mounts[(name, target)] = (COMPOSE.parent / source).resolve()
            elif source not in (compose.get("volumes") or {}):
                fail(f"{COMPOSE.name}: {name} uses the volume {source!r}, which is not declared")
        for secret in service.get("secrets", []):
            if secret not in (compose.get("secrets") or {}):
                fail(f"{COMPOSE.name}: {name} uses the secret {secret!r}, which is not declared")
    # Prometheus reads the files prometheus.yml names, next to it in the container.
    if mounts.get(("prometheus", "/etc/prometheus/prometheus.yml")) != PROMETHEUS_CONFIG:
        fail(f"{COMPOSE.name}: prometheus does not mount {PROMETHEUS_CONFIG.name} at /etc/prometheus/prometheus.yml")
    for rule_file in prometheus_config.get("rule_files", []):
        if mounts.get(("prometheus", f"/etc/prometheus/{rule_file}")) != (MONITORING / rule_file).resolve():
            fail(f"{COMPOSE.name}: prometheus does not mount {rule_file} next to its configuration")
    # The scrape target is the gateway service's metrics_listen port.
    metrics_listen = yaml.safe_load(GATEWAY_COMPOSE_CONFIG.read_text())["metrics_listen"]
    port = metrics_listen.rsplit(":", 1)[1]
    targets = [
        target
        for job in prometheus_config["scrape_configs"]
        if job["job_name"] == "hsm-gateway"
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    if targets != [f"gateway:{port}"]:
        fail(f"{PROMETHEUS_CONFIG.name}: the hsm-gateway job scrapes {targets}, not the gateway service's gateway:{port}")
    # Grafana: provisioning and dashboards where the provider and the datasource expect them.
    if mounts.get(("grafana", "/etc/grafana/provisioning")) != (MONITORING / "grafana" / "provisioning").resolve():
        fail(f"{COMPOSE.name}: grafana does not mount the provisioning directory at /etc/grafana/provisioning")
    path = providers["providers"][0]["options"]["path"]
    if mounts.get(("grafana", path)) != DASHBOARD.parent.resolve():
        fail(f"{DASHBOARD_PROVIDERS.name}: the provider reads {path}, where grafana does not mount the dashboards")
    url = datasources["datasources"][0]["url"]
    if url != "http://prometheus:9090":
        fail(f"{DATASOURCES.name}: the data source points at {url}, not the prometheus service")


def check_docs(alerts):
    text = OPERATIONS.read_text()
    match = re.search(r"^## Metrics that matter\n(.*?)(?=^## )", text, re.S | re.M)
    if not match:
        fail(f"{OPERATIONS}: no section 'Metrics that matter'")
        return
    section = match.group(1)
    if "docker/monitoring/hsm-gateway.rules.yml" not in section:
        fail(f"{OPERATIONS.name}: 'Metrics that matter' does not point at docker/monitoring/hsm-gateway.rules.yml")
    table = [line for line in section.splitlines() if line.startswith("|")]
    documented = set(re.findall(r"`(HSMGateway\w+)`", "\n".join(table)))
    for name in sorted(set(alerts) - documented):
        fail(f"{OPERATIONS.name}: the alert table does not list {name}")
    for name in sorted(documented - set(alerts)):
        fail(f"{OPERATIONS.name}: the alert table lists {name}, which the rules file does not have")


def write_dashboard_rules(path):
    """The dashboard's queries as recording rules, with its variables filled in, so that
    `promtool check rules` parses them as PromQL."""
    substitutions = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
    rules = []
    for panel in dashboard_panels(json.loads(DASHBOARD.read_text())):
        for target in panel.get("targets") or []:
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            if "$" in expr:
                fail(f"{DASHBOARD.name}: panel {panel['title']!r} uses an unknown variable: {target['expr']}")
            rules.append({"record": f"dashboard:panel_{panel['id']}:{target['refId']}", "expr": expr})
    Path(path).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))


def main(argv):
    if len(argv) == 3 and argv[1] == "--write-dashboard-rules":
        write_dashboard_rules(argv[2])
        for message in failures:
            print(f"check-monitoring: FAIL {message}", file=sys.stderr)
        return 1 if failures else 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 64
    live = load_live(argv[1:])
    methods, statuses = source_names()
    rules = yaml.safe_load(RULES.read_text())
    exprs, recorded, alerts = rules_exprs(rules)
    checker = Checker(live, recorded, methods, statuses)
    for where, expr in exprs:
        checker.check_expr(where, expr)
    tests = yaml.safe_load(RULE_TESTS.read_text())
    for number, test in enumerate(tests["tests"], 1):
        for series in test.get("input_series", []):
            checker.check_series(f"{RULE_TESTS.name}: test {number}", series["series"])
        for alert_test in test.get("alert_rule_test", []):
            if alert_test["alertname"] not in alerts:
                fail(f"{RULE_TESTS.name}: test {number} names an unknown alert {alert_test['alertname']}")
    tested = {t["alertname"] for test in tests["tests"] for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
    for name in sorted(set(alerts) - tested):
        fail(f"{RULE_TESTS.name}: no test shows {name} firing")

    panels = check_dashboard(checker, json.loads(DASHBOARD.read_text()))
    check_compose(
        yaml.safe_load(PROMETHEUS_CONFIG.read_text()),
        yaml.safe_load(DASHBOARD_PROVIDERS.read_text()),
        yaml.safe_load(DATASOURCES.read_text()),
    )
    check_docs(alerts)

    gateway_names = sorted(n for n in checker.used if n in live)
    print(
        f"check-monitoring: {len(alerts)} alerts, {len(recorded)} recording rule(s), {panels} dashboard panels; "
        f"{len(gateway_names)} gateway metrics used, all live: {', '.join(gateway_names)}"
    )
    unused = sorted(
        n for n in live if not n.endswith(("_sum", "_count")) and n not in checker.used
    )
    if unused:
        print(f"check-monitoring: exported but in no rule or panel: {', '.join(unused)}")
    for message in failures:
        print(f"check-monitoring: FAIL {message}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
