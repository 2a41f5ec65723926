"""The public surface is what we mean it to be; importing iot2ml stays cheap."""

import subprocess
import sys

import iot2ml


def test_top_level_exports():
    assert sorted(iot2ml.__all__) == ["Client", "Settings", "__version__"]
    assert iot2ml.Client.__name__ == "Client" and iot2ml.Settings.__name__ == "Settings"


def test_module_exports():
    from iot2ml import api, auth, broker, ingest, lake, query, simulate

    assert sorted(lake.__all__) == ["Lake", "Maintainer"]
    assert sorted(query.__all__) == ["QueryResult", "list_tables", "query_arrow", "run_query"]
    assert sorted(ingest.__all__) == ["Decoded", "Decoder", "InMessage"]
    assert sorted(broker.__all__) == ["EmbeddedNats", "nats_server_binary", "render_config"]
    assert sorted(auth.__all__) == ["Devices", "Guard", "Keys", "Principal"]
    assert api.__all__ == ["create_app", "create_serve_app"]
    assert {"run_simulation", "get_scenario", "SCENARIOS"} <= set(simulate.__all__)
    from iot2ml import ml

    assert ml.__all__ == ["AnomalyTask", "ClassifyTask", "ForecastTask", "OnlineAnomalyScorer", "Registry",
                          "RegressTask", "TrainJob", "TrainResult"]
    assert all(getattr(ml, name).__name__ == name for name in ml.__all__)


def test_import_is_cheap_and_keeps_heavy_drivers_out():
    code = "import sys, iot2ml; print(sorted(m for m in ('mlflow', 'deltalake', 'duckdb', 'nats', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
