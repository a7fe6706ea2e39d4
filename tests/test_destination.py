"""Where a journal belongs, and where each replay sends it (pure logic)."""

from __future__ import annotations

import pytest

from rlm_mlflow._destination import (
    Destination,
    Leave,
    Send,
    normalise,
    resolve,
    route,
)


def test_a_sink_resolves_its_uri_as_mlflow_would_without_importing_it() -> None:
    assert resolve("http://given:5000", {"MLFLOW_TRACKING_URI": "http://env:5000"}) == (
        "http://given:5000"
    )
    assert resolve(None, {"MLFLOW_TRACKING_URI": "http://env:5000"}) == "http://env:5000"
    assert resolve(None, {}) == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    ("uri", "same_as"),
    [
        ("sqlite:///mlflow.db", "sqlite:////work/bench/mlflow.db"),
        ("sqlite:///runs/../mlflow.db", "sqlite:////work/bench/mlflow.db"),
        ("sqlite:////work/bench/mlflow.db", "sqlite:////work/bench/mlflow.db"),
        ("sqlite:///mlflow.db?timeout=5", "sqlite:////work/bench/mlflow.db?timeout=5"),
        ("HTTP://Tracking.Example:5000/", "http://tracking.example:5000"),
        ("https://h.example/mlflow//", "https://h.example/mlflow"),
        ("https://me:s3cret@h.example/", "https://me:***@h.example"),
        ("postgresql://me:s3cret@db:5432/mlflow", "postgresql://me:***@db:5432/mlflow"),
        ("mlruns", "file:///work/bench/mlruns"),
        ("file:///work/bench/mlruns/", "file:///work/bench/mlruns"),
        ("databricks", "databricks"),
    ],
)
def test_equal_destinations_compare_equal(uri: str, same_as: str) -> None:
    assert normalise(uri, cwd="/work/bench") == same_as
    assert normalise(same_as, cwd="/elsewhere") == same_as  # the written form stays as it is


def test_a_relative_sqlite_path_is_the_writers_own() -> None:
    assert normalise("sqlite:///mlflow.db", cwd="/a") != normalise("sqlite:///mlflow.db", "/b")


@pytest.mark.parametrize(
    ("meta", "named"),
    [
        ({}, None),
        ({"experiment": "e", "tracking_uri": ""}, None),  # a sink given no URI, before
        ({"experiment": "e", "tracking_uri": "sqlite:///mlflow.db"}, None),  # whose cwd?
        ({"experiment": "e", "tracking_uri": 5}, None),
        (
            {"experiment": "e", "tracking_uri": "http://h:5000/"},
            Destination("http://h:5000", "e"),
        ),
        ({"tracking_uri": "http://h:5000"}, Destination("http://h:5000", "rlm-code-rlm")),
    ],
)
def test_journals_of_older_versions_name_a_destination_only_where_it_can_be_placed(
    meta: dict[str, object], named: Destination | None
) -> None:
    assert Destination.named_by(meta) == named


A = {"experiment": "a", "tracking_uri": "http://127.0.0.1:5999"}
A_SECRET = {"experiment": "a", "tracking_uri": "http://me:***@127.0.0.1:5999"}
NOWHERE = {"experiment": "x", "tracking_uri": ""}


def test_a_sink_replays_its_own_destinations_journals_alone() -> None:
    own = Destination("http://127.0.0.1:5999", "a")
    assert route(A, "http://127.0.0.1:5999/", own) == Send("http://127.0.0.1:5999/", "a")
    other_experiment = Destination("http://127.0.0.1:5999", "b")
    assert route(A, "http://127.0.0.1:5999", other_experiment) == Leave(
        "http://127.0.0.1:5999 (experiment a)", False
    )
    assert isinstance(route(A, None, Destination("sqlite:////x/mlflow.db", "a")), Leave)
    assert isinstance(route(NOWHERE, None, Destination("http://h", "x")), Leave)  # never


def test_a_sync_given_a_uri_takes_the_journals_for_it_and_those_naming_none() -> None:
    assert route(A, "http://127.0.0.1:5999") == Send("http://127.0.0.1:5999", "a")
    assert route(NOWHERE, "http://127.0.0.1:5000") == Send("http://127.0.0.1:5000", "x")
    assert route(A, "http://127.0.0.1:5000") == Leave("http://127.0.0.1:5999 (experiment a)", False)
    given = "http://me:pw@127.0.0.1:5999"  # the user gives the password the spool lacks
    assert route(A_SECRET, given) == Send(given, "a")


def test_a_sync_given_no_uri_sends_each_journal_to_its_own() -> None:
    assert route(A, None) == Send("http://127.0.0.1:5999", "a")
    assert route(NOWHERE, None) == Leave("no tracking URI (experiment x)", True)
    left = route(A_SECRET, None)
    assert isinstance(left, Leave) and left.needs_uri and "password" in left.destination
