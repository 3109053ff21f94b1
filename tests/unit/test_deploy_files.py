"""The Grafana dashboard and the Prometheus alerts only use metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus-alerts.yml"
METRIC_NAME = re.compile(r"\bfictures_[a-z0-9_]+")
# The sample names each metric type adds to its family's name.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}
IMAGE = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 1}


async def exported_names(client: httpx.AsyncClient) -> set[str]:
    """Every sample name ``/metrics`` can hold, from its families' names and types."""
    text = (await client.get("/metrics")).text
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            expressions.append(variable["definition"])
    return expressions


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.fixture
async def names(client: httpx.AsyncClient) -> set[str]:
    # Exercise both engines first so that every labelled series exists.
    await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 2})
    await client.post("/api/v1/images/generate", json=IMAGE)
    return await exported_names(client)


async def test_the_dashboard_uses_only_exported_metrics(names: set[str]) -> None:
    used = {name for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 10
    assert used - names == set()


async def test_the_alerts_use_only_exported_metrics(names: set[str]) -> None:
    used = {name for rule in alert_rules() for name in METRIC_NAME.findall(rule["expr"])}
    assert used
    assert used - names == set()


def test_the_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 30
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    text = "\n".join(dashboard_expressions())
    for needed in [
        "fictures_http_requests_total",  # request rate, error rate
        'status=~"5.."',
        "fictures_http_request_duration_seconds_bucket",  # latency p50/p95
        "fictures_time_to_first_token_seconds_bucket",
        "fictures_inter_token_latency_seconds_bucket",
        "fictures_generation_tokens_total",  # tokens/s
        "fictures_requests_waiting",  # queue
        "fictures_image_render_seconds_bucket",
        "fictures_engine_up",
        # vLLM's own figures: prefix-cache hit rate, KV-cache use, its running/waiting split.
        "fictures_vllm_prefix_cache_hits_total",
        "fictures_vllm_prefix_cache_queries_total",
        "fictures_vllm_kv_cache_usage_perc",
        "fictures_vllm_num_requests_running",
        "fictures_vllm_num_requests_waiting",
        # Speculative decoding: acceptance and tokens per step.
        "fictures_vllm_spec_decode_num_accepted_tokens_total",
        "fictures_vllm_spec_decode_num_draft_tokens_total",
        "fictures_vllm_spec_decode_num_drafts_total",
    ]:
        assert needed in text, needed
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"


def test_the_alerts_cover_what_operators_need() -> None:
    rules = alert_rules()
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert {
        "FicturesEngineDown",
        "FicturesHighErrorRate",
        "FicturesImageQueueSaturated",
        "FicturesTextQueueSaturated",
        "FicturesTimeToFirstTokenRegression",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
    recorded = {rule["record"] for rule in rules if "record" in rule}
    # Alerts that use recording rules use ones defined here.
    for rule in alerts.values():
        for name in re.findall(r"\bfictures:[a-z0-9_:]+", rule["expr"]):
            assert name in recorded
