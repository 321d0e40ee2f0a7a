"""Secure aggregation (SECAGG=true): the aggregator learns only the sum of a round's updates.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, the semi-honest
variant (no signatures, no consistency check): the aggregator follows the protocol and
may read all it holds, but does not lie about who dropped. docs/secagg.md has the
threat model, the phases and the costs.

| module | what it holds |
|---|---|
| shamir.py | t-of-n secret sharing over GF(2^521 - 1) |
| fixedpoint.py | weighted deltas in Z_(2^64), the overflow bound |
| crypto.py | HKDF key derivation, X25519, the ChaCha20 PRG, AES-GCM |
| party.py | a client's four phases, pure functions of the worker secret and the task |
| server.py | one round attempt on the aggregator: U1..U4, thresholds, unmasking |
| vectors.py | a model's tensors as one flat vector and back, alike on both sides |
| stage.py | the pipeline stage: the worker's delta masked; the workers' secret file |
| settings.py | the combinations SECAGG=true refuses at settings load |

The service around it: aggregator/tasks/secagg.py (the phases as tasks),
aggregator/secure.py and secagg_api.py, client/secagg.py, protocol/secagg.py.
"""
