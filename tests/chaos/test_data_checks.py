"""The data checks catch each broken promise in a synthetic run and pass a clean one.

A run here is made by hand the way correct nodes would make it: the dataset's results come
from the very operations the service enclave runs, tokens are the KM state's own ``Token``
records (their canonical bodies signed with one token key), results are sealed to the user's
key and published on the platform's and the user's topics. Then one thing is broken per test:
a token past its grant, a node signing other bytes, a result for another key, a second
result, a computation consumed on a tampered blob, a token that never ended, a marker on the
host side.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from dataclasses import asdict, replace
from typing import Any

import pytest
from nacl.public import PublicKey, SealedBox
from nacl.signing import SigningKey

from kmnode.chaos.data_calls import (
    ComputeAnswer,
    ComputeArgs,
    DatasetArgs,
    ExpectedResult,
    GrantAnswer,
    GrantArgs,
    HeldKey,
    RevokeArgs,
)
from kmnode.chaos.data_checks import (
    check_data_determinism,
    check_data_liveness,
    check_data_results,
    check_data_tamper,
    check_data_tokens,
    data_needles,
    tamper_windows,
)
from kmnode.chaos.data_evidence import (
    DataEvidence,
    DataKeys,
    GrantRecord,
    NodeData,
    ResultRecord,
    SignedToken,
    TokenRecord,
)
from kmnode.chaos.data_workload import DATASET_OPS, PARAMS, dataset_text
from kmnode.chaos.history import History, HistoryRecorder
from kmnode.chaos.outcome import CheckOutcome
from kmnode.chaos.plaintext import check_plaintext
from kmnode.dataauth.ops import BUILTIN_OPS, Limits, canonical_json, params_digest, run_op
from kmnode.dataauth.table import parse_table
from kmnode.identity import IdentityKeys
from kmnode.km.dataauth import Grant, Token

USER = IdentityKeys.generate("dev-admin")
OTHER = IdentityKeys.generate("eve")
KEYS = [
    HeldKey(USER.name, USER.box_secret),
    HeldKey(OTHER.name, OTHER.box_secret),
    HeldKey(USER.name, IdentityKeys.generate(USER.name).box_secret, decoy=True),
]
TOKEN_KEY = SigningKey(bytes(range(32)))
DATA_KEYS = DataKeys(
    wrap_key="11" * 32, token_key=bytes(TOKEN_KEY.verify_key).hex(), input_key="22" * 32
)
NODES = ("km1", "km2", "km3")
MEASUREMENT = "ab" * 32
DATASET = "ds"
MARKER = "mk0123456789abcdef"
NOW = 1_000_000


class Tick:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def user_pk(keys: IdentityKeys) -> str:
    return keys.public(["user"]).box_key


class Scenario:
    """A run against correct nodes: grants, computations and revocations recorded in the
    history as the workload records them, and what every node would hold and publish."""

    def __init__(self) -> None:
        self.rec = HistoryRecorder(Tick())
        table = parse_table(dataset_text(MARKER, random.Random(1)))
        limits = Limits(min_group_size=5)
        self.expected = {
            op: ExpectedResult(
                params=PARAMS[op], result=run_op(op, table, PARAMS[op], "high", limits).decode()
            )
            for op in DATASET_OPS
        }
        args = DatasetArgs(
            dataset=DATASET, privacy="high", ops=list(DATASET_OPS), min_group_size=5,
            digest_ct="c" * 64, digest_pt="d" * 64, marker=MARKER, expected=self.expected,
        )  # fmt: skip
        handle = self.rec.invoke("setup", "data.register", args.to_json(), "km1")
        handle.ok({"dataset": DATASET, "owner": USER.name})
        self.grants: dict[str, Grant] = {}
        self.tokens: dict[str, Token] = {}
        self.records: list[ResultRecord] = []
        self.index = 10

    def grant(self, ops: list[str], uses: int, ttl: int = 600) -> str:
        self.index += 1
        grant = Grant(f"g{self.index}", DATASET, USER.name, sorted(ops), uses, uses,
                      NOW + ttl, self.index)  # fmt: skip
        self.grants[grant.id] = grant
        args = GrantArgs(dataset=DATASET, user=USER.name, ops=ops, uses=uses, ttl=ttl)
        handle = self.rec.invoke("c0", "data.grant", args.to_json(), "km1")
        handle.ok(GrantAnswer(grant=grant.id, state="active", uses_left=uses).to_json())
        return grant.id

    def revoke(self, grant_id: str) -> None:
        self.index += 1
        self.grants[grant_id].revoked_index = self.index
        handle = self.rec.invoke("c0", "data.revoke", RevokeArgs(grant=grant_id).to_json(), "km1")
        told = GrantAnswer(grant=grant_id, state="revoked", uses_left=0)
        handle.ok(told.to_json())

    def compute(
        self,
        op: str,
        node: str = "km1",
        state: str = "consumed",
        result: bytes | None = None,
        seal_to: IdentityKeys = USER,
        told: bool = True,
    ) -> Token:
        """A computation a grant covers: its token issued, run (or refused) and published."""
        grant = next(g for g in self.grants.values() if not g.refusal(op, NOW))
        grant.uses_left -= 1
        self.index += 1
        token = Token(
            id=f"t{self.index}", grant=grant.id, dataset=DATASET, digest_ct="c" * 64,
            digest_pt="d" * 64, user=USER.name, user_box_key=user_pk(USER), op=op,
            op_checksum=BUILTIN_OPS[op].checksum,
            params=params_digest(self.expected[op].params), node=node, measurement=MEASUREMENT,
            issued_index=self.index, issued_at=NOW, expires_at=min(grant.expires_at, NOW + 600),
            uses_left_after=grant.uses_left,
        )  # fmt: skip
        self.tokens[token.id] = token
        args = ComputeArgs(dataset=DATASET, user=USER.name, op=op, node=node, intent="granted")
        handle = self.rec.invoke("c1", "data.compute", args.to_json(), node)
        self.index += 1
        token = replace(token, state=state, finished_index=self.index)
        if state == "consumed":
            plain = self.expected[op].result.encode() if result is None else result
            sealed = bytes(SealedBox(PublicKey(bytes.fromhex(user_pk(seal_to)))).encrypt(plain))
            token = replace(token, result_hash=hashlib.sha256(sealed).hexdigest())
            self.publish(token, sealed)
            opened = canonical_json(json.loads(plain)).decode()
        else:
            token = replace(token, reason="blob-digest: the blob is not the one registered")
            self.publish(token, b"")
            opened = None
        self.tokens[token.id] = token
        answer = ComputeAnswer(
            token=token.id, grant=grant.id, state=state, reason=token.reason,  # type: ignore[arg-type]
            result_hash=token.result_hash, result=opened,
        )  # fmt: skip
        if told:
            handle.ok(answer.to_json())
        else:  # what a client is told when it certainly did not happen (here: a lie)
            handle.fail("409 refused: no uses left")
        return token

    def publish(self, token: Token, sealed: bytes, node: str | None = None) -> None:
        fields: dict[str, Any] = {
            "token": token.id, "user": token.user, "dataset": token.dataset, "op": token.op,
            "status": token.state, "reason": token.reason,
            "sealed": base64.b64encode(sealed).decode(),
            "result_hash": hashlib.sha256(sealed).hexdigest() if sealed else "",
        }  # fmt: skip
        self.records.append(ResultRecord(topic="service", source=node or token.node, **fields))
        self.records.append(ResultRecord(topic="user", source=token.user, **fields))

    def history(self) -> History:
        return self.rec.history()

    def evidence(self) -> DataEvidence:
        def view() -> NodeData:
            signed = {
                t.id: SignedToken(
                    body=t.body().decode(), signature=TOKEN_KEY.sign(t.body()).signature.hex()
                )
                for t in self.tokens.values()
            }
            return NodeData(
                keys=DATA_KEYS,
                tokens={t.id: TokenRecord.model_validate(t.public()) for t in self.tokens.values()},
                grants={g.id: GrantRecord.model_validate(asdict(g)) for g in self.grants.values()},
                signed=signed,
            )

        return DataEvidence(
            datasets=[DATASET], nodes={n: view() for n in NODES}, records=list(self.records)
        )


def good() -> Scenario:
    run = Scenario()
    main = run.grant(["mean", "sum"], 3)
    run.grant(["count"], 1)
    run.compute("mean", "km1")
    run.compute("sum", "km2")
    run.compute("count", "km3")
    run.compute("mean", "km2", state="refused")
    run.revoke(main)
    return run


def all_checks(run: Scenario, evidence: DataEvidence | None = None) -> dict[str, CheckOutcome]:
    history = run.history()
    ops = history.operations()
    evidence = run.evidence() if evidence is None else evidence
    return {
        "tokens": check_data_tokens(ops, evidence),
        "determinism": check_data_determinism(evidence),
        "results": check_data_results(ops, evidence, KEYS),
        "tamper": check_data_tamper(ops, history.faults()),
        "liveness": check_data_liveness(evidence),
    }


def failing(outcome: CheckOutcome, *words: str) -> None:
    assert not outcome.valid, outcome.detail
    for word in words:
        assert word in outcome.detail, outcome.detail


def test_a_correct_run_passes_every_data_check() -> None:
    checks = all_checks(good())
    assert all(c.valid for c in checks.values()), {n: c.detail for n, c in checks.items()}
    assert checks["tokens"].detail.startswith("4 token(s) on 3 node(s)")
    assert "6 published result(s) of 3 token(s)" in checks["results"].detail  # 2 topics each
    assert "3 key(s) tried" in checks["results"].detail
    assert "3 consumed, 1 refused" in checks["liveness"].detail


# --- data-tokens ---------------------------------------------------------------------------


def test_a_token_issued_after_its_grants_revocation_fails() -> None:
    run = good()
    evidence = run.evidence()
    for view in evidence.nodes.values():
        token = next(iter(view.tokens.values()))
        grant = view.grants[token.grant]
        view.grants[grant.id] = grant.model_copy(update={"revoked_index": token.issued_index - 1})
    failing(check_data_tokens(run.history().operations(), evidence), "after its grant", "revoked")


def test_more_tokens_than_uses_or_uses_miscounted_fail() -> None:
    run = good()
    evidence = run.evidence()
    view = evidence.nodes["km2"]
    count_grant = next(g for g in view.grants.values() if g.ops == ["count"])
    view.grants[count_grant.id] = count_grant.model_copy(update={"uses": 0, "uses_left": 0})
    failing(check_data_tokens(run.history().operations(), evidence), "km2: grant", "for 0 use(s)")


def test_a_token_outside_its_grant_fails_each_way() -> None:
    """The nodes' grant g11 (mean, sum) changed under its tokens t13 (mean), t15 (sum)."""
    cases: dict[str, tuple[str, Any]] = {
        "t13 is for mean, its grant g11 covers sum": ("ops", ["sum"]),
        "t13 was issued at time 1000000, its grant g11 had expired": ("expires_at", NOW),
        "t13 is dev-admin's on ds, its grant g11 is not": ("user", "eve"),
        "t13 was issued at 13, its grant at 13": ("index", 13),
    }
    for words, (field, value) in cases.items():
        run = good()
        evidence = run.evidence()
        for view in evidence.nodes.values():
            view.grants["g11"] = view.grants["g11"].model_copy(update={field: value})
        failing(check_data_tokens(run.history().operations(), evidence), f"km1: token {words}")


def test_a_token_ended_differently_on_two_nodes_or_missing_on_one_fails() -> None:
    run = good()
    evidence = run.evidence()
    view = evidence.nodes["km3"]
    view.tokens["t13"] = view.tokens["t13"].model_copy(update={"state": "refused"})
    failing(check_data_tokens(run.history().operations(), evidence), "t13 ended differently")
    evidence = run.evidence()
    view = evidence.nodes["km1"]  # the last use of g11 lost on km1, and its count with it
    del view.tokens["t19"]
    view.grants["g11"] = view.grants["g11"].model_copy(update={"uses_left": 1})
    outcome = check_data_tokens(run.history().operations(), evidence)
    failing(outcome, "token t19 is missing on km1")
    assert outcome.violations == 2  # and the nodes disagree on g11's uses


def test_answers_unlike_the_nodes_records_fail() -> None:
    run = good()
    evidence = run.evidence()
    for view in evidence.nodes.values():
        del view.tokens["t13"]
        del view.signed["t13"]
    failing(check_data_tokens(run.history().operations(), evidence), "which no node holds")
    run = good()
    evidence = run.evidence()
    for view in evidence.nodes.values():
        view.tokens["t13"] = view.tokens["t13"].model_copy(update={"result_hash": "e" * 64})
    failing(check_data_tokens(run.history().operations(), evidence), "told token t13 consumed")


def test_a_token_from_a_computation_sent_after_the_revocation_was_acknowledged_fails() -> None:
    run = Scenario()
    grant = run.grant(["mean"], 3)
    run.revoke(grant)
    run.grants[grant].revoked_index = 0  # the nodes "forgot" it: the history still knows
    run.compute("mean")
    failing(check_data_tokens(run.history().operations(), run.evidence()), "after the grant's")


def test_more_tokens_than_computations_sent_fails() -> None:
    run = Scenario()
    run.grant(["mean"], 3)
    run.compute("mean")
    run.compute("mean", told=False)  # the client was told it did not happen
    outcome = check_data_tokens(run.history().operations(), run.evidence())
    failing(outcome, "2 token(s) on ds, but clients sent only 1 computation(s)")


def test_an_unreadable_node_and_a_malformed_history_fail() -> None:
    run = good()
    evidence = run.evidence()
    evidence.nodes["km2"] = NodeData.unreadable("connection refused")
    failing(check_data_tokens(run.history().operations(), evidence), "km2: no data view")
    rec = HistoryRecorder(Tick())
    rec.invoke("c0", "data.compute", {"dataset": DATASET}, "km1").ok({"token": "t1"})
    failing(check_data_tokens(rec.history().operations(), run.evidence()), "malformed")


# --- data-determinism -------------------------------------------------------------------------


def test_a_node_signing_other_bytes_or_with_another_key_fails() -> None:
    run = good()
    evidence = run.evidence()
    view = evidence.nodes["km2"]
    body = view.signed["t13"].body.replace('"mean"', '"sum"')
    other = SigningKey.generate().sign(body.encode()).signature.hex()
    view.signed["t13"] = SignedToken(body=body, signature=other)
    outcome = check_data_determinism(evidence)
    failing(outcome, "t13: nodes sign different bytes")
    assert outcome.violations == 2  # the differing bytes, and km2's signature not verifying


def test_a_signed_body_unlike_its_record_fails() -> None:
    run = good()
    evidence = run.evidence()
    for view in evidence.nodes.values():
        view.tokens["t13"] = view.tokens["t13"].model_copy(update={"uses_left_after": 7})
    failing(check_data_determinism(evidence), "unlike its record in uses_left_after")


def test_nodes_disagreeing_on_the_data_keys_fails() -> None:
    run = good()
    evidence = run.evidence()
    keys = DATA_KEYS.model_copy(update={"token_key": "33" * 32})
    evidence.nodes["km3"] = evidence.nodes["km3"].model_copy(update={"keys": keys})
    failing(check_data_determinism(evidence), "disagree on the data keys")


# --- data-results -------------------------------------------------------------------------


def test_a_result_sealed_to_another_key_fails() -> None:
    run = Scenario()
    run.grant(["mean"], 2)
    run.compute("mean", seal_to=OTHER)
    outcome = check_data_results(run.history().operations(), run.evidence(), KEYS)
    failing(outcome, "does not open with this key (dev-admin's)")
    run = good()  # eve holds the user's very key: the result opens for her too
    shared = [*KEYS, HeldKey(OTHER.name, USER.box_secret)]
    outcome = check_data_results(run.history().operations(), run.evidence(), shared)
    failing(outcome, "opens with eve's key too")


def test_a_wrong_value_committed_and_opened_fails() -> None:
    run = Scenario()
    run.grant(["mean"], 2)
    wrong = run.expected["mean"].result.replace('"value":', '"value":1').encode()
    run.compute("mean", result=wrong)
    outcome = check_data_results(run.history().operations(), run.evidence(), KEYS)
    failing(outcome, "the client opened another mean than the dataset's")
    assert outcome.violations == 3  # and each of its 2 records gives another mean


def test_a_second_result_or_a_result_of_a_refused_token_fails() -> None:
    run = good()
    token = run.tokens["t13"]
    again = bytes(SealedBox(PublicKey(bytes.fromhex(user_pk(USER)))).encrypt(b"{}"))
    run.publish(token, again)
    outcome = check_data_results(run.history().operations(), run.evidence(), KEYS)
    failing(outcome, "t13/consumed", "its hash is not the committed")
    assert outcome.violations == 3  # 2 records of the second result, and 2 results of t13
    run = good()
    refused = next(t for t in run.tokens.values() if t.state == "refused")
    sealed = bytes(SealedBox(PublicKey(bytes.fromhex(user_pk(USER)))).encrypt(b"{}"))
    consumed = Token(**{**asdict(refused), "state": "consumed"})
    run.publish(consumed, sealed)
    outcome = check_data_results(run.history().operations(), run.evidence(), KEYS)
    failing(outcome, "the ledger says is refused")


def test_a_result_on_the_wrong_topic_or_of_an_unknown_token_fails() -> None:
    run = good()
    run.publish(run.tokens["t13"], b"", node="km3")
    run.records[-2] = run.records[-2].model_copy(update={"status": "refused"})
    outcome = check_data_results(run.history().operations(), run.evidence(), KEYS)
    failing(outcome, "published by km3, the token's platform is km1")
    run = good()
    ghost = Token(**{**asdict(run.tokens["t13"]), "id": "t99"})
    run.publish(ghost, b"")
    failing(check_data_results(run.history().operations(), run.evidence(), KEYS), "no node holds")


def test_without_the_users_key_a_result_cannot_be_judged() -> None:
    run = good()
    others = [k for k in KEYS if k.name != USER.name or k.decoy]
    outcome = check_data_results(run.history().operations(), run.evidence(), others)
    failing(outcome, "holds no key of dev-admin")


# --- data-tamper --------------------------------------------------------------------------


def tampered(state: str, skipped: bool = False) -> Scenario:
    run = Scenario()
    run.grant(["mean"], 3)
    run.compute("mean", "km2")
    detail = {"skipped": "no copy"} if skipped else {"digest": "c" * 16}
    run.rec.fault_start("tamper-blob", "km2", **detail)
    run.compute("mean", "km1")  # another node: not judged
    run.compute("mean", "km2", state=state)
    run.rec.fault_stop("tamper-blob", "km2")
    return run


def test_a_computation_consumed_on_a_tampered_blob_fails_and_refused_passes() -> None:
    run = tampered("consumed")
    history = run.history()
    outcome = check_data_tamper(history.operations(), history.faults())
    failing(outcome, "consumed while its blob was tampered")
    assert outcome.first_violation is not None and outcome.first_violation.node == "km2"
    history = tampered("refused").history()
    outcome = check_data_tamper(history.operations(), history.faults())
    assert outcome.valid and "1 computation(s)" in outcome.detail and "1 refused" in outcome.detail
    history = tampered("consumed", skipped=True).history()
    assert tamper_windows(history.faults()) == []
    assert check_data_tamper(history.operations(), history.faults()).valid


# --- data-liveness ------------------------------------------------------------------------


def test_a_token_that_never_ended_fails() -> None:
    run = good()
    evidence = run.evidence()
    view = evidence.nodes["km1"]
    view.tokens["t13"] = view.tokens["t13"].model_copy(update={"state": "issued"})
    failing(check_data_liveness(evidence), "km1: token t13 for km1 is still issued")


# --- plaintext ----------------------------------------------------------------------------


def test_the_marker_and_the_results_values_are_searched_for() -> None:
    run = good()
    needles = data_needles(run.history().operations())
    assert MARKER.encode() in needles
    mean = json.loads(run.expected["mean"].result)["value"]
    assert json.dumps(mean).encode() in needles
    assert run.expected["mean"].result.encode() in needles
    assert b"40" not in needles  # the count: too short to be distinctive
    clean = [("node.log", b"token t13 consumed"), ("mqtt:x", b"\x00" * 64)]
    assert check_plaintext(clean, needles).valid
    leaked = [*clean, ("km2/service.log", b"row 3: " + MARKER.encode().hex().encode())]
    outcome = check_plaintext(leaked, needles)
    assert not outcome.valid and "km2/service.log" in outcome.detail


def test_reprs_of_the_records_leave_the_plaintext_out() -> None:
    run = good()
    shown = repr(run.expected["mean"]) + repr(next(iter(KEYS)))
    answer = run.history().operations()[-2].value
    shown += repr(ComputeAnswer.parse(answer))
    assert run.expected["mean"].result not in shown and USER.box_secret.hex() not in shown
    assert MARKER not in repr(DatasetArgs.parse(run.history().operations()[0].args))


@pytest.mark.parametrize("check", ["tokens", "results", "tamper", "liveness"])
def test_a_run_without_data_operations_passes(check: str) -> None:
    rec = HistoryRecorder(Tick())
    rec.invoke("c0", "read", {"key": "k"}, "km1").ok({"generation": 0})
    empty = DataEvidence(datasets=[DATASET], nodes={n: NodeData() for n in NODES}, records=[])
    history = rec.history()
    ops = history.operations()
    outcome = {
        "tokens": lambda: check_data_tokens(ops, empty),
        "results": lambda: check_data_results(ops, empty, KEYS),
        "tamper": lambda: check_data_tamper(ops, history.faults()),
        "liveness": lambda: check_data_liveness(empty),
    }[check]()
    assert outcome.valid, outcome.detail
