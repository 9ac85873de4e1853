"""The data checks of a chaos run (issue 15's checker bullet; DESIGN.md, "Chaos and checking":
every token used at most once and only within its grant; no plaintext on the host).

* ``check_data_tokens``: on every node, every token of the run's datasets names a grant that
  was committed before it, is the token's user's on its dataset, covers its operation, was
  unrevoked and unexpired at the token's issue, and outlives it; tokens per grant never exceed
  the granted uses and account for every use spent (each token says how many uses were left
  after it); every node holds the same tokens, each ended once and alike; what clients were
  told (tokens, how they ended, grants, revocations) is what the nodes hold, and no token
  comes from a computation sent after its grant's revocation was acknowledged;
* ``check_data_determinism``: every node gives the same data keys, and for each token
  byte-identical canonical bodies and signatures, which verify under the token key and say
  what the token's record says;
* ``check_data_results``: every ``data.result`` record captured on MQTT belongs to a token of
  the run, on its platform's topic or its user's; a consumed one carries the committed hash,
  its bytes hash to it, it opens with its user's key and with no other key the run holds, and
  gives the value the client computed from its own plaintext; a token has at most one
  consumed result, and none at all if the ledger says it was refused; every result a client
  opened is the expected one;
* ``check_data_tamper``: a computation on a node while its host had tampered with the blob
  (``tamper-blob``) ended refused, never consumed;
* ``check_data_liveness``: after quiescence every token on every node was consumed or refused;
* ``data_needles``: what the plaintext scan looks for besides keys: the dataset's marker and
  the values of its results.

Pure functions of the history, the ``DataEvidence`` and (for the results) the keys the run
holds; messages name tokens, grants, nodes, states and digests, never data, values or keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, SealedBox
from nacl.signing import VerifyKey

from kmnode.chaos.data_calls import (
    ComputeAnswer,
    DataFormatError,
    DataOps,
    DatasetArgs,
    HeldKey,
    parse_data_ops,
)
from kmnode.chaos.data_evidence import (
    TERMINAL,
    DataEvidence,
    GrantRecord,
    NodeData,
    ResultRecord,
    SignedToken,
    TokenRecord,
)
from kmnode.chaos.history import FaultEvent, Operation
from kmnode.chaos.outcome import CheckOutcome, Violation
from kmnode.chaos.plaintext import MIN_NEEDLE
from kmnode.dataauth.client_side import ResultError, open_result
from kmnode.dataauth.ops import canonical_json, params_digest

#: The nemesis kind that flips a bit of a node's copy of the run's dataset blob.
TAMPER_BLOB = "tamper-blob"


def _parsed(ops: Iterable[Operation]) -> DataOps | CheckOutcome:
    try:
        return parse_data_ops(ops)
    except DataFormatError as exc:
        return CheckOutcome.judge(
            [Violation(f"a malformed data operation in the history: {exc}")], ""
        )


# --- tokens within their grants ----------------------------------------------------------------


def check_data_tokens(ops: Sequence[Operation], evidence: DataEvidence) -> CheckOutcome:
    """See the module docstring (first point)."""
    parsed = _parsed(ops)
    if isinstance(parsed, CheckOutcome):
        return parsed
    violations: list[Violation] = []
    for name, view in sorted(evidence.nodes.items()):
        if view.error:
            violations.append(Violation(f"{name}: no data view ({view.error})", None, name))
        else:
            violations += _within_grants(name, view)
    readable = evidence.readable()
    violations += _nodes_agree(readable)
    answered = _told(parsed, evidence.tokens(), violations)
    tokens = evidence.tokens()
    grants = {g for view in readable.values() for g in view.grants}
    ended = sum(1 for t in tokens.values() if t.state in TERMINAL)
    return CheckOutcome.judge(
        violations,
        f"{len(tokens)} token(s) on {len(readable)} node(s), each within an unrevoked, unexpired "
        f"grant covering it; {len(grants)} grant(s) within their uses; {ended} ended once and "
        f"alike everywhere; {answered} answer(s) to clients match",
    )


def _within_grants(name: str, view: NodeData) -> list[Violation]:
    violations = []
    by_grant: dict[str, list[TokenRecord]] = defaultdict(list)
    for token in sorted(view.tokens.values(), key=lambda t: t.issued_index):
        grant = view.grants.get(token.grant)
        if grant is None:
            message = f"{name}: token {token.id} names grant {token.grant}, which {name} lacks"
            violations.append(Violation(message, None, name))
            continue
        by_grant[grant.id].append(token)
        for problem in _outside(token, grant):
            violations.append(Violation(f"{name}: token {token.id} {problem}", None, name))
    for grant in view.grants.values():
        mine = by_grant.get(grant.id, [])
        spent = grant.uses - grant.uses_left
        if len(mine) > grant.uses:
            message = f"{name}: grant {grant.id} gave {len(mine)} tokens for {grant.uses} use(s)"
            violations.append(Violation(message, None, name))
        if spent != len(mine):
            message = f"{name}: grant {grant.id} counts {spent} use(s) spent, {len(mine)} token(s)"
            violations.append(Violation(message, None, name))
        for k, token in enumerate(mine, start=1):
            if token.uses_left_after != grant.uses - k:
                violations.append(
                    Violation(
                        f"{name}: token {token.id}, use {k} of grant {grant.id}'s {grant.uses}, "
                        f"says {token.uses_left_after} use(s) left",
                        None,
                        name,
                    )
                )
    return violations


def _outside(token: TokenRecord, grant: GrantRecord) -> list[str]:
    """How ``token`` is not within ``grant`` at its issue (empty if it is)."""
    problems = []
    if (grant.dataset, grant.user) != (token.dataset, token.user):
        problems.append(f"is {token.user}'s on {token.dataset}, its grant {grant.id} is not")
    if token.op not in grant.ops:
        problems.append(f"is for {token.op}, its grant {grant.id} covers {', '.join(grant.ops)}")
    if grant.index >= token.issued_index:
        problems.append(f"was issued at {token.issued_index}, its grant at {grant.index}")
    if grant.revoked_index and grant.revoked_index < token.issued_index:
        problems.append(
            f"was issued at {token.issued_index}, after its grant {grant.id} was revoked at "
            f"{grant.revoked_index}"
        )
    if token.issued_at >= grant.expires_at:
        problems.append(
            f"was issued at time {token.issued_at}, its grant {grant.id} had expired at "
            f"{grant.expires_at}"
        )
    if token.expires_at > grant.expires_at:
        problems.append(f"expires at {token.expires_at}, after its grant ({grant.expires_at})")
    return problems


def _nodes_agree(readable: Mapping[str, NodeData]) -> list[Violation]:
    """Every node holds the same tokens, each ended alike (once), and the same grants."""
    violations = []
    names = sorted(readable)
    ids = sorted({t for view in readable.values() for t in view.tokens}, key=_index_of)
    for token_id in ids:
        held = {n: readable[n].tokens.get(token_id) for n in names}
        missing = [n for n, t in held.items() if t is None]
        if missing:
            violations.append(Violation(f"token {token_id} is missing on {', '.join(missing)}"))
        ends = {n: t.end for n, t in held.items() if t is not None}
        if len(set(ends.values())) > 1:
            shown = ", ".join(f"{n}={e[0]}/{e[1][:12]}@{e[3]}" for n, e in sorted(ends.items()))
            violations.append(Violation(f"token {token_id} ended differently: {shown}"))
    grants = sorted({g for view in readable.values() for g in view.grants})
    for grant_id in grants:
        seen = {
            n: (g.uses_left, g.revoked_index)
            for n in names
            if (g := readable[n].grants.get(grant_id)) is not None
        }
        if len(seen) < len(names) or len(set(seen.values())) > 1:
            shown = ", ".join(
                f"{n}=" + (f"{s[0]} left/revoked@{s[1]}" if (s := seen.get(n)) else "missing")
                for n in names
            )
            violations.append(Violation(f"nodes disagree on grant {grant_id}: {shown}"))
    return violations


def _index_of(token_id: str) -> int:
    digits = token_id[1:]
    return int(digits) if digits.isdigit() else 0


def _told(parsed: DataOps, tokens: Mapping[str, TokenRecord], violations: list[Violation]) -> int:
    """What the clients were told against what the nodes hold; the number of answers checked."""
    answered = 0
    told_token: dict[str, Operation] = {}
    for op, args, answer in parsed.computes:
        if answer is None:
            continue
        answered += 1
        if answer.token in told_token:
            other = told_token[answer.token].id
            violations.append(Violation(f"op {other} was told of token {answer.token} too", op))
        told_token[answer.token] = op
        token = tokens.get(answer.token)
        if token is None:
            violations.append(Violation(f"told of token {answer.token}, which no node holds", op))
            continue
        asked = (answer.grant, args.user, args.op, args.dataset, args.node)
        held = (token.grant, token.user, token.op, token.dataset, token.node)
        if asked != held:
            violations.append(
                Violation(f"token {token.id} is {'/'.join(held)}, the client asked {asked}", op)
            )
        if answer.state in TERMINAL and (answer.state, answer.result_hash) != (
            token.state,
            token.result_hash,
        ):
            violations.append(
                Violation(
                    f"told token {token.id} {answer.state}/{answer.result_hash[:12]}, the nodes "
                    f"hold {token.state}/{token.result_hash[:12]}",
                    op,
                )
            )
    for dataset in parsed.datasets:
        made = sum(
            1 for op, a, _ in parsed.computes if a.dataset == dataset and op.outcome != "fail"
        )
        issued = sum(1 for t in tokens.values() if t.dataset == dataset)
        if issued > made:
            violations.append(
                Violation(
                    f"{issued} token(s) on {dataset}, but clients sent only {made} computation(s) "
                    "that may have been taken"
                )
            )
    _told_grants(parsed, tokens, violations)
    return answered


def _told_grants(
    parsed: DataOps, tokens: Mapping[str, TokenRecord], violations: list[Violation]
) -> None:
    """A grant told made or revoked stays so; no token of a grant from a computation sent
    after its revocation was acknowledged."""
    revoked_at: dict[str, float] = {}
    for op, revoke, revoked in parsed.revokes:
        if revoked is not None:
            if revoked.grant != revoke.grant or revoked.state != "revoked":
                message = f"asked to revoke {revoke.grant}, told {revoked.grant} is {revoked.state}"
                violations.append(Violation(message, op))
            revoked_at[revoke.grant] = min(
                revoked_at.get(revoke.grant, op.complete_time), op.complete_time
            )
    for op, _, answer in parsed.computes:
        if answer is None:
            continue
        token = tokens.get(answer.token)
        grant = answer.grant if token is None else token.grant
        if grant in revoked_at and op.invoke_time > revoked_at[grant]:
            violations.append(
                Violation(
                    f"token {answer.token} of grant {grant}, from a computation sent after the "
                    "grant's revocation was acknowledged",
                    op,
                )
            )
    for op, grant_args, told in parsed.grants:
        if told is not None and told.uses_left != grant_args.uses:
            message = f"grant {told.grant} made with {told.uses_left} use(s), not {grant_args.uses}"
            violations.append(Violation(message, op))


# --- identical tokens everywhere ---------------------------------------------------------------


def check_data_determinism(evidence: DataEvidence) -> CheckOutcome:
    """See the module docstring (second point)."""
    readable = evidence.readable()
    violations: list[Violation] = []
    keys = {n: v.keys for n, v in readable.items()}
    distinct = {k for k in keys.values() if k is not None}
    if len(distinct) > 1 or any(k is None for k in keys.values()):
        shown = ", ".join(f"{n}={k.token_key[:12] if k else '-'}" for n, k in sorted(keys.items()))
        violations.append(Violation(f"nodes disagree on the data keys: {shown}"))
    token_key = next(iter(distinct)).token_key if len(distinct) == 1 else None
    ids = sorted({t for view in readable.values() for t in view.tokens}, key=_index_of)
    compared = 0
    for token_id in ids:
        signed = {
            n: view.signed.get(token_id) for n, view in readable.items() if token_id in view.tokens
        }
        missing = sorted(n for n, s in signed.items() if s is None)
        if missing:
            message = f"{', '.join(missing)} gave no signed body of token {token_id}"
            violations.append(Violation(message))
        present = {n: s for n, s in signed.items() if s is not None}
        forms = {(s.body, s.signature) for s in present.values()}
        if len(forms) > 1:
            shown = ", ".join(f"{n}={_short(s)}" for n, s in sorted(present.items()))
            violations.append(Violation(f"token {token_id}: nodes sign different bytes: {shown}"))
        compared += len(present) >= 2 and len(forms) == 1
        for name, one in sorted(present.items()):
            record = readable[name].tokens[token_id]
            problem = _signed_problem(one, record, token_key)
            if problem:
                violations.append(Violation(f"{name}: token {token_id} {problem}", None, name))
    return CheckOutcome.judge(
        violations,
        f"{len(readable)} node(s) agree on the data keys; {compared} token(s) signed "
        f"byte-identically by 2+ nodes, every signature verifies under the token key",
    )


def _short(signed: SignedToken) -> str:
    body = hashlib.sha256(signed.body.encode()).hexdigest()[:12]
    return f"{body}/{signed.signature[:12]}"


#: The signed body's fields against the record's.
_BODY_FIELDS = (
    ("id", "id"), ("grant", "grant"), ("data", "dataset"), ("digest", "digest_ct"),
    ("digest_pt", "digest_pt"), ("user", "user"), ("user_pk", "user_box_key"), ("op", "op"),
    ("op_checksum", "op_checksum"), ("params", "params"), ("issued", "issued_index"),
    ("issued_at", "issued_at"), ("expires_at", "expires_at"),
    ("uses_left_after", "uses_left_after"),
)  # fmt: skip


def _signed_problem(signed: SignedToken, record: TokenRecord, token_key: str | None) -> str:
    """Why ``signed`` is not ``record``'s token signed under ``token_key`` ("" if it is)."""
    if token_key is not None:
        try:
            VerifyKey(bytes.fromhex(token_key)).verify(
                signed.body.encode(), bytes.fromhex(signed.signature)
            )
        except (BadSignatureError, ValueError):
            return "is signed with a signature that does not verify under the token key"
    try:
        body = json.loads(signed.body)
    except ValueError:
        return "has a signed body that is not JSON"
    if not isinstance(body, dict):
        return "has a signed body that is not an object"
    platform = body.get("platform")
    differs = [b for b, r in _BODY_FIELDS if body.get(b) != getattr(record, r)]
    if not isinstance(platform, dict) or (platform.get("node"), platform.get("measurement")) != (
        record.node,
        record.measurement,
    ):
        differs.append("platform")
    return f"has a signed body unlike its record in {', '.join(differs)}" if differs else ""


# --- results only to their user, only once ----------------------------------------------------


def check_data_results(
    ops: Sequence[Operation], evidence: DataEvidence, keys: Sequence[HeldKey]
) -> CheckOutcome:
    """See the module docstring (third point). ``keys``: every identity key the run holds."""
    parsed = _parsed(ops)
    if isinstance(parsed, CheckOutcome):
        return parsed
    datasets = parsed.datasets
    tokens = evidence.tokens()
    violations: list[Violation] = []
    consumed: dict[str, set[str]] = defaultdict(set)
    opened = 0
    records = [r for r in evidence.records if r.dataset in evidence.datasets]
    for record in records:
        token = tokens.get(record.token)
        if token is None:
            violations.append(Violation(f"{record.shown()}: a result of a token no node holds"))
            continue
        problems = _misplaced(record, token)
        if record.status == "consumed":
            consumed[token.id].add(record.result_hash)
            problems += _consumed_problems(record, token, keys, datasets.get(token.dataset))
            opened += not problems
        elif record.sealed or record.result_hash:
            problems.append(f"is {record.status} but carries a result")
        violations += [Violation(f"{record.shown()}: {p}", None, record.source) for p in problems]
    for token_id, hashes in sorted(consumed.items(), key=lambda item: _index_of(item[0])):
        if len(hashes) > 1:
            shown = ", ".join(sorted(h[:12] for h in hashes))
            violations.append(Violation(f"token {token_id} has {len(hashes)} results: {shown}"))
    told = 0
    for op, args, answer in parsed.computes:
        if answer is None or answer.state != "consumed":
            continue
        told += 1
        problem = _told_problem(answer, datasets.get(args.dataset), args.op)
        if problem:
            violations.append(Violation(f"token {answer.token}: {problem}", op))
    unpublished = sum(1 for t in tokens.values() if t.state == "consumed" and t.id not in consumed)
    return CheckOutcome.judge(
        violations,
        f"{opened} published result(s) of {len(consumed)} token(s) carry the committed hash, "
        f"open only with their user's key ({len(keys)} key(s) tried) and give the expected "
        f"value; {told} result(s) opened by clients are right; {unpublished} consumed "
        f"token(s) without a captured record; {evidence.malformed_records} malformed record(s)",
    )


def _misplaced(record: ResultRecord, token: TokenRecord) -> list[str]:
    problems = []
    if (record.user, record.dataset, record.op) != (token.user, token.dataset, token.op):
        problems.append(f"names {record.user}/{record.dataset}/{record.op}, unlike its token")
    if record.topic == "service" and record.source != token.node:
        problems.append(f"was published by {record.source}, the token's platform is {token.node}")
    if record.topic == "user" and record.source != token.user:
        problems.append(f"is on {record.source}'s topic, the token is {token.user}'s")
    return problems


def _consumed_problems(
    record: ResultRecord,
    token: TokenRecord,
    keys: Sequence[HeldKey],
    dataset: DatasetArgs | None,
) -> list[str]:
    if token.state != "consumed":
        return [f"a result was released for a token the ledger says is {token.state}"]
    if record.result_hash != token.result_hash:
        return [f"its hash is not the committed {token.result_hash[:12]}"]
    own = [k for k in keys if k.name == token.user and not k.decoy]
    if not own:
        return [f"the run holds no key of {token.user} to open it with"]
    try:
        result = open_result(record.sealed, record.result_hash, own[0].box_secret)
    except ResultError as exc:
        return [f"{exc} ({token.user}'s)"]
    problems = [
        f"opens with {k.name}'s {'decoy ' if k.decoy else ''}key too"
        for k in keys
        if k is not own[0] and _opens(record.sealed, k)
    ]
    expected = _expected(dataset, token.op, token.params)
    if expected is not None and canonical_json(result).decode() != expected:
        problems.append(f"gives another {token.op} than the dataset's")
    return problems


def _opens(sealed_b64: str, key: HeldKey) -> bool:
    try:
        SealedBox(PrivateKey(key.box_secret)).decrypt(base64.b64decode(sealed_b64, validate=True))
    except (CryptoError, binascii.Error, ValueError):
        return False
    return True


def _expected(dataset: DatasetArgs | None, op: str, params: str | None) -> str | None:
    """The result the client computed for ``op`` (with the parameters whose digest is
    ``params``; None: any), or None if it computed none."""
    expected = None if dataset is None else dataset.expected.get(op)
    if expected is None or (params is not None and params != params_digest(expected.params)):
        return None
    return expected.result


def _told_problem(answer: ComputeAnswer, dataset: DatasetArgs | None, op: str) -> str:
    if answer.unopened:
        return f"the client could not open its result: {answer.unopened}"
    expected = _expected(dataset, op, None)
    if answer.result is not None and expected is not None and answer.result != expected:
        return f"the client opened another {op} than the dataset's"
    return ""


# --- a tampered blob gives no result --------------------------------------------------------


def tamper_windows(faults: Iterable[FaultEvent]) -> list[tuple[str, float, float]]:
    """(node, start, stop) of each ``tamper-blob`` the nemesis did make (not skipped); a fault
    never healed lasts to the end."""
    windows: list[tuple[str, float, float]] = []
    open_at: dict[str, float] = {}
    for event in faults:
        if event.fault != TAMPER_BLOB:
            continue
        if event.phase == "start" and "skipped" not in event.detail:
            open_at[event.target] = event.time
        elif event.phase == "stop" and event.target in open_at:
            windows.append((event.target, open_at.pop(event.target), event.time))
    windows += [(node, start, float("inf")) for node, start in open_at.items()]
    return windows


def check_data_tamper(ops: Sequence[Operation], faults: Sequence[FaultEvent]) -> CheckOutcome:
    """See the module docstring (fourth point): a computation sent to a node after its host
    tampered with the blob, and answered before the blob was restored, ran its job in between,
    so it must have been refused."""
    parsed = _parsed(ops)
    if isinstance(parsed, CheckOutcome):
        return parsed
    windows = tamper_windows(faults)
    violations = []
    judged = refused = 0
    for op, args, answer in parsed.computes:
        if answer is None:
            continue
        inside = any(
            node == args.node and start < op.invoke_time and op.complete_time < stop
            for node, start, stop in windows
        )
        if not inside or answer.state == "issued":
            continue
        judged += 1
        if answer.state == "consumed":
            message = (
                f"token {answer.token} on {args.node} was consumed while its blob was tampered"
            )
            violations.append(Violation(message, op, args.node))
        else:
            refused += 1
    return CheckOutcome.judge(
        violations,
        f"{len(windows)} tamper-blob fault(s): {judged} computation(s) on a tampered node "
        f"ended during the tamper, {refused} refused, none consumed",
    )


# --- every token ends -----------------------------------------------------------------------


def check_data_liveness(evidence: DataEvidence) -> CheckOutcome:
    """See the module docstring (fifth point)."""
    violations = []
    counts: dict[str, int] = defaultdict(int)
    for token in evidence.tokens().values():
        counts[token.state] += 1
    for name, view in evidence.readable().items():
        for token in sorted(view.tokens.values(), key=lambda t: t.issued_index):
            if token.state not in TERMINAL:
                message = f"{name}: token {token.id} for {token.node} is still {token.state}"
                violations.append(Violation(message, None, name))
    lag = max((v.revocation_lag_ms for v in evidence.readable().values()), default=0.0)
    shown = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no token"
    return CheckOutcome.judge(
        violations,
        f"every token ended ({shown}); slowest revocation observed by a service enclave "
        f"{lag:.1f} ms",
    )


# --- plaintext needles ----------------------------------------------------------------------


def data_needles(ops: Iterable[Operation]) -> list[bytes]:
    """What the scan looks for besides keys, from the history: each dataset's marker, and each
    result the client expected or opened (its canonical JSON, and its value's text if long
    enough to be distinctive)."""
    try:
        parsed = parse_data_ops(ops)
    except DataFormatError:
        return []
    found: dict[bytes, None] = {}
    results = []
    for _, dataset in parsed.registered:
        found[dataset.marker.encode()] = None
        results += [e.result for e in dataset.expected.values()]
    results += [a.result for _, _, a in parsed.computes if a is not None and a.result]
    for text in results:
        for needle in (text, _value_text(text)):
            if needle is not None and len(needle) >= MIN_NEEDLE:
                found[needle.encode()] = None
    return list(found)


def _value_text(result: str) -> str | None:
    try:
        value = json.loads(result).get("value")
    except (ValueError, AttributeError):
        return None
    return json.dumps(value, separators=(",", ":")) if value is not None else None


__all__ = [
    "TAMPER_BLOB",
    "check_data_determinism",
    "check_data_liveness",
    "check_data_results",
    "check_data_tamper",
    "check_data_tokens",
    "data_needles",
    "tamper_windows",
]
