"""``wattstream dashboards push`` against a real local HTTP server speaking Grafana's API.

Grafana cannot be installed here (see tests/grafana_api.py), so the server is a
stand-in that follows Grafana's documented HTTP API; the client side is the real
command, the real grafana-client and real HTTP.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result
from grafana_client import GrafanaApi

from pipeline.cli import main
from pipeline.cli_dashboards import TOKEN_ENV
from pipeline.dashboards import FOLDER_UID, DashboardError, load_dashboards, push
from pipeline.local import free_port
from tests.grafana_api import GrafanaAPI

pytestmark = pytest.mark.integration

SHIPPED = load_dashboards()
SHIPPED_UIDS = {d.uid for d in SHIPPED}


@pytest.fixture
def grafana() -> Iterator[GrafanaAPI]:
    # A fresh token per test, so "the token never appears in the output" means something.
    with GrafanaAPI(f"glsa_{secrets.token_hex(16)}", viewer_token=secrets.token_hex(16)) as api:
        yield api


def dashboards(*args: str, token: str | None) -> Result:
    """Run ``wattstream dashboards ARGS`` with only ``token`` in WATTSTREAM_GRAFANA_TOKEN."""
    return CliRunner().invoke(main, ["dashboards", *args], env={TOKEN_ENV: token})


def assert_clean_exit(result: Result, code: int) -> None:
    """The exit code is the command's own, not a crash click turned into 1."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def in_folder(api: GrafanaAPI, folder_uid: str = FOLDER_UID) -> dict[str, int]:
    """uid -> version of the dashboards stored in a folder."""
    return {
        uid: saved["version"]
        for uid, saved in api.state.dashboards.items()
        if saved["folderUid"] == folder_uid
    }


def test_first_push_creates_the_folder_and_every_dashboard_in_it(grafana: GrafanaAPI) -> None:
    result = dashboards("push", "--grafana-url", grafana.url, token=grafana.token)

    assert_clean_exit(result, 0)
    assert list(grafana.state.folders) == [FOLDER_UID]
    assert grafana.state.folders[FOLDER_UID]["title"] == "wattstream"
    assert in_folder(grafana) == dict.fromkeys(SHIPPED_UIDS, 1)
    assert len(SHIPPED_UIDS) == 5
    for dashboard in SHIPPED:
        stored = grafana.state.dashboards[dashboard.uid]["dashboard"]
        assert stored["panels"] == dashboard.model["panels"]
        assert stored["templating"] == dashboard.model["templating"]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("created ") for line in lines) == 5
    assert lines[-1] == "done: 5 created, 0 updated"
    assert grafana.token not in result.output


def test_second_push_updates_in_place_and_adds_nothing(grafana: GrafanaAPI) -> None:
    first = dashboards("push", "--grafana-url", grafana.url, token=grafana.token)
    assert_clean_exit(first, 0)
    ids = {uid: saved["dashboard"]["id"] for uid, saved in grafana.state.dashboards.items()}

    second = dashboards("push", "--grafana-url", grafana.url, "--json", token=grafana.token)

    assert_clean_exit(second, 0)
    assert list(grafana.state.folders) == [FOLDER_UID]
    assert in_folder(grafana) == dict.fromkeys(SHIPPED_UIDS, 2)
    assert {uid: saved["dashboard"]["id"] for uid, saved in grafana.state.dashboards.items()} == ids
    reported = json.loads(second.stdout)
    assert {(r["uid"], r["version"], r["created"]) for r in reported} == {
        (uid, 2, False) for uid in SHIPPED_UIDS
    }
    # What Grafana's search answers: one dashboard per uid, all in the folder.
    api = GrafanaApi.from_url(grafana.url + "/", credential=grafana.token)
    hits = api.search.search_dashboards(type_="dash-db", folder_uids=[FOLDER_UID])
    assert sorted(hit["uid"] for hit in hits) == sorted(SHIPPED_UIDS)
    assert grafana.token not in first.output + second.output


def test_folder_title_is_set_on_the_fixed_folder_uid(grafana: GrafanaAPI) -> None:
    assert_clean_exit(
        dashboards("push", "--grafana-url", grafana.url, "--folder", "Energy", token=grafana.token),
        0,
    )
    assert grafana.state.folders[FOLDER_UID]["title"] == "Energy"
    # Pushing with another title renames the same folder rather than making a second one.
    assert_clean_exit(
        dashboards("push", "--grafana-url", grafana.url, "--folder", "Plant", token=grafana.token),
        0,
    )
    assert [f["title"] for f in grafana.state.folders.values()] == ["Plant"]
    assert in_folder(grafana) == dict.fromkeys(SHIPPED_UIDS, 2)


def test_wrong_token_exits_1_with_a_clear_message(grafana: GrafanaAPI) -> None:
    wrong = f"glsa_{secrets.token_hex(16)}"
    result = dashboards("push", "--grafana-url", grafana.url, token=wrong)

    assert_clean_exit(result, 1)
    assert result.stderr.strip().splitlines() == [
        f"wattstream: Grafana at {grafana.url} refused the token (401 Unauthorized); "
        f"check {TOKEN_ENV}"
    ]
    assert wrong not in result.output
    assert grafana.state.folders == {} and grafana.state.dashboards == {}


def test_token_without_write_permission_exits_1_naming_the_refusal(grafana: GrafanaAPI) -> None:
    assert grafana.viewer_token is not None
    result = dashboards("push", "--grafana-url", grafana.url, token=grafana.viewer_token)

    assert_clean_exit(result, 1)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"wattstream: Grafana at {grafana.url} refused the request: ")
    assert "403" in line and "permissions" in line
    assert grafana.viewer_token not in result.output
    assert grafana.state.dashboards == {}


@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_token_exits_2_naming_the_variable(grafana: GrafanaAPI, token: str | None) -> None:
    result = dashboards("push", "--grafana-url", grafana.url, token=token)

    assert_clean_exit(result, 2)
    assert TOKEN_ENV in result.stderr
    assert grafana.requests == [], "nothing may be sent without a token"


def test_unreachable_grafana_exits_1(grafana: GrafanaAPI) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = dashboards("push", "--grafana-url", url, token=grafana.token)

    assert_clean_exit(result, 1)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"wattstream: cannot reach Grafana at {url}: ")
    assert grafana.token not in result.output


def test_grafana_under_a_sub_path() -> None:
    """Behind a reverse proxy Grafana lives at e.g. /grafana; its API at /grafana/api."""
    token = secrets.token_hex(16)
    with GrafanaAPI(token, path_prefix="/grafana") as api:
        for url in (api.url, api.url + "/"):
            results = push(url, token)
            assert {r.uid for r in results} == SHIPPED_UIDS
        assert in_folder(api) == dict.fromkeys(SHIPPED_UIDS, 2)
        assert all(path.startswith("/grafana/api/") for _, path in api.requests)


def test_push_reports_each_result_as_it_goes(grafana: GrafanaAPI) -> None:
    seen: list[str] = []
    results = push(grafana.url, grafana.token, on_result=lambda r: seen.append(r.uid))
    assert seen == [r.uid for r in results] == [d.uid for d in SHIPPED]
    assert all(r.created and r.version == 1 for r in results)
    assert all(r.url is not None and r.url.startswith(f"/d/{r.uid}/") for r in results)

    with pytest.raises(DashboardError, match="refused the token") as error:
        push(grafana.url, "not-the-token")
    assert "not-the-token" not in str(error.value)
