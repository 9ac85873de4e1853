"""Attestation throughput against its floor: raw Ed25519 verification, measured in the same run.

A quote verification is one Ed25519 signature check plus parsing and policy checks (the
platform certificate's check is cached per verifier), so raw ``VerifyKey.verify`` over the same
bytes is the limit it is compared with. The handshake figure is CPU time for both sides of one
complete mutual attestation (two quotes made, two verified, two X25519 exchanges, keys derived).

    python -m bench.attest            # 7 rounds, medians
    python -m bench.attest --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

from nacl.signing import VerifyKey

from attest.certs import TcbStatus
from attest.handshake import HandshakeConfig, Initiator, Responder
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveIdentity, EnclaveRole, measure_sources, signer_id
from attest.policy import Policy
from attest.quote import Quote, QuoteVerifier, report_data_for
from bench.machine import cpu_model

NOW = time.time()


def _seed(label: str) -> bytes:
    return label.encode().ljust(32, b"\0")


def _rate(func: Callable[[], object], count: int) -> float:
    """Operations per second of CPU time for ``count`` calls of ``func``."""
    start = time.process_time()
    for _ in range(count):
        func()
    elapsed = time.process_time() - start
    return count / elapsed if elapsed > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations, 3 rounds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    verifies = 500 if args.quick else 5000
    handshakes = 50 if args.quick else 500

    vendor = VendorRoot(_seed("vendor"))
    platforms = {n: Platform(n, TcbStatus.UP_TO_DATE, _seed(n), vendor) for n in ("a", "b")}
    km = EnclaveIdentity(measure_sources({"km.py": b"km"}), signer_id("bench"), 1, 1)
    policy = Policy(km_measurements=frozenset({km.measurement}), min_svn=1)
    report_data = report_data_for(b"bench", b"x")
    encoded = platforms["a"].enclave(km).quote(report_data, NOW)
    parsed = Quote.decode(encoded)
    raw_key = VerifyKey(platforms["a"].certificate.attestation_key)
    verifier = QuoteVerifier(vendor.public_key)
    directory = {f"node-{n}": n for n in platforms}

    def raw_verify() -> object:
        return raw_key.verify(parsed.signed_body, parsed.signature)

    def quote_verify() -> object:
        return verifier.verify(encoded, policy, report_data, role=EnclaveRole.KM, now=NOW)

    def handshake() -> object:
        def config(name: str) -> HandshakeConfig:
            return HandshakeConfig(f"node-{name}", platforms[name].enclave(km), verifier, directory)

        initiator = Initiator(config("a"), policy, "node-b")
        responder = Responder(config("b"), policy)
        answer = responder.receive(initiator.start(), NOW)
        assert answer is not None
        responder.receive(initiator.receive(answer, NOW), NOW)
        assert initiator.done and responder.done
        return initiator.result

    raw_rates, quote_rates, hs_rates = [], [], []
    for _ in range(rounds):
        raw_rates.append(_rate(raw_verify, verifies))
        quote_rates.append(_rate(quote_verify, verifies))
        hs_rates.append(_rate(handshake, handshakes))

    raw = statistics.median(raw_rates)
    quote = statistics.median(quote_rates)
    hs = statistics.median(hs_rates)
    results = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "rounds": rounds,
        "raw_ed25519_verify_per_s": round(raw),
        "quote_verify_per_s": round(quote),
        "quote_verify_cost_vs_raw": round(raw / quote, 3),
        "handshakes_per_s": round(hs),
        "handshake_cpu_ms": round(1000 / hs, 3),
        "goals": {"quote_verify_cost_vs_raw_max": 1.5, "handshake_cpu_ms_max": 1.0},
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}; median of {rounds} rounds (CPU time)")
    print(f"raw Ed25519 verify     {raw:>10,.0f} /s   (the limit)")
    print(f"quote verify           {quote:>10,.0f} /s   cost {raw / quote:.2f}x raw (goal <= 1.5x)")
    print(f"full mutual handshake  {hs:>10,.0f} /s   {1000 / hs:.3f} ms CPU each (goal < 1 ms)")


if __name__ == "__main__":
    main()
