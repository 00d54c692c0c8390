"""``civicmesh models train | evaluate | release | list | keygen``."""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from civicmesh import topics
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import Message, MqttLink
from civicmesh.protocol import encode_model_release
from civicmesh.timeutil import now_ms
from training.errors import TrainingError

MODELS = ("cal-co", "cal-no2", "cal-pm25", "fault")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="edge models: train, evaluate, release, list")
    cmds = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    train = cmds.add_parser("train", help="train, export to ONNX, quantize, write model cards")
    train.add_argument("--out", type=Path, default=Path("models"), help="artifact folder")
    train.add_argument("--only", action="append", choices=MODELS, help="one model (repeatable)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--small", action="store_true", help="a small slice (CI): minutes -> s")
    train.set_defaults(func=_train)

    evaluate = cmds.add_parser(
        "evaluate", help="run the shipped ONNX artifacts on the held-out data again"
    )
    evaluate.add_argument("folder", type=Path, help="the folder `models train` wrote")
    evaluate.set_defaults(func=_evaluate)

    keygen = cmds.add_parser("keygen", help="make a release key (0600); prints its public key")
    keygen.add_argument("--key", type=Path, required=True)
    keygen.set_defaults(func=_keygen)

    release = cmds.add_parser("release", help="sign a model release; write it and/or publish it")
    release.add_argument("artifact", type=Path, help="a model folder (with card.json)")
    release.add_argument("--version", required=True, help="dotted numbers, e.g. 1.2.0")
    release.add_argument("--key", type=Path, required=True, help="the release key")
    release.add_argument(
        "--group", action="append", required=True, help="device group to roll out to"
    )
    release.add_argument("--min-agent-version", default="0.1.0")
    release.add_argument("--out", type=Path, help="write the signed release to this file")
    release.add_argument("--mqtt-url", help="publish it retained on models/{group}/{name}")
    release.add_argument("--tls-ca", type=Path)
    release.add_argument("--tls-cert", type=Path)
    release.add_argument("--tls-key", type=Path)
    release.set_defaults(func=_release)

    listing = cmds.add_parser("list", help="local artifacts and, with --mqtt-url, releases out")
    listing.add_argument("folder", type=Path, nargs="?", default=Path("models"))
    listing.add_argument("--mqtt-url")
    listing.add_argument("--wait-s", type=float, default=1.0, help="how long to collect")
    listing.set_defaults(func=_list)


def _train(args: argparse.Namespace) -> int:
    from training.pipeline import build

    failures = 0
    for name in args.only or MODELS:
        started = time.monotonic()
        card = build(name, args.out, args.seed, small=args.small)
        failures += 0 if card["metrics"]["target_met"] else 1
        print(_summary(card, time.monotonic() - started), flush=True)
    print(f"artifacts and model cards in {args.out}/")
    if failures:
        print(f"{failures} model(s) below their target: see the cards")
    return 0


def _summary(card: dict[str, Any], seconds: float | None = None) -> str:
    m = card["metrics"]
    shipped = card["variants"][card["ships"]]
    if card["name"] == "fault":
        f1 = ", ".join(f"{k} {v['f1']:.2f}" for k, v in m["injected"].items())
        headline = f"F1 {f1}; false alarms {m['false_alarms_per_device_day']:.2f}/device-day"
    elif card["name"] == "cal-pm25":
        site = m["site_split"]
        headline = (
            f"MAE site split {site['ours']['mae']:.2f} vs US-EPA {site['us_epa']['mae']:.2f} "
            f"(raw {site['raw']['mae']:.2f}); time split {m['time_split']['ours']['mae']:.2f} "
            f"vs {m['time_split']['us_epa']['mae']:.2f}"
        )
    else:
        headline = (
            f"MAE {m['ours']['mae']:.3f} vs linear {m['linear_own_sensor_t_rh']['mae']:.3f} "
            f"({m['mae_reduction_vs_linear_own_sensor']:.0%} lower; "
            f"{m['mae_reduction_vs_linear_all_channels']:.0%} vs all-channel linear)"
        )
    took = "" if seconds is None else f" [{seconds:.0f} s]"
    return (
        f"{card['name']}: {headline}; ships {card['ships']} {shipped['bytes']} B, "
        f"{shipped['latency_us_median_1_row']:.0f} µs/row; target "
        f"{'met' if m['target_met'] else 'NOT met'}{took}"
    )


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_folder

    worst = 0.0
    for name, result in evaluate_folder(args.folder).items():
        print(f"{name}: {json.dumps(result, sort_keys=True)}")
        worst = max(worst, float(result.get("max_diff_vs_card", 0.0)))
    print(f"largest difference from the model cards: {worst:.2g}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    signer = Ed25519Signer.generate()
    signer.save(args.key)
    print(f"release public key (edge setting models.release_keys): {signer.verify_key().to_text()}")
    return 0


def manifest_for(
    folder: Path, version: str, groups: list[str], min_agent: str
) -> tuple[dict[str, Any], bytes]:
    """The release manifest of a model folder, and its artifact."""
    try:
        card = json.loads((folder / "card.json").read_text())
        artifact = (folder / "model.onnx").read_bytes()
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{folder} is not a model folder: {exc}") from None
    for group in groups:
        topics.model_release(group, card["name"])  # validates both
    runtime = card["runtime"]
    manifest = {
        "name": card["name"],
        "version": version,
        "format": "onnx",
        "sha256": hashlib.sha256(artifact).hexdigest(),
        "size": len(artifact),
        "variant": card["ships"],
        "target_sensor_types": runtime["target_sensor_types"],
        "min_agent_version": min_agent,
        "groups": sorted(groups),
        "released_at_ms": now_ms(),
        "runtime": runtime,
        "metrics": {"target_met": card["metrics"]["target_met"]},
    }
    return manifest, artifact


def _link(args: argparse.Namespace, client_id: str) -> MqttLink:
    return MqttLink(
        args.mqtt_url,
        client_id,
        tls_ca=str(args.tls_ca) if getattr(args, "tls_ca", None) else None,
        tls_cert=str(args.tls_cert) if getattr(args, "tls_cert", None) else None,
        tls_key=str(args.tls_key) if getattr(args, "tls_key", None) else None,
    )


def publish_release(link: MqttLink, message: bytes, name: str, groups: list[str]) -> None:
    for group in groups:
        link.publish(topics.model_release(group, name), message, qos=1, retain=True)


def _release(args: argparse.Namespace) -> int:
    if not args.out and not args.mqtt_url:
        raise TrainingError("give --out FILE, --mqtt-url URL, or both")
    signer = Ed25519Signer.load(args.key)
    manifest, artifact = manifest_for(
        args.artifact, args.version, args.group, args.min_agent_version
    )
    message = encode_model_release(signer, manifest, artifact)
    if args.out:
        args.out.write_bytes(message)
        print(f"wrote {args.out} ({len(message)} bytes)")
    if args.mqtt_url:
        link = _link(args, f"civicmesh-release-{signer.key_id}")
        link.connect()
        try:
            publish_release(link, message, manifest["name"], args.group)
        finally:
            link.close()
        print(f"published {manifest['name']} {args.version} to groups {', '.join(args.group)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    for card_path in sorted(args.folder.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        print(_summary(card))
    if args.mqtt_url:
        found: dict[str, bytes] = {}
        lock = threading.Lock()

        def keep(message: Message) -> None:
            with lock:
                found[message.topic] = message.payload

        link = MqttLink(args.mqtt_url, f"civicmesh-models-list-{now_ms()}")
        link.subscribe(f"{topics.ROOT}/models/+/+", keep)
        link.connect()
        time.sleep(args.wait_s)
        link.close()
        for topic, payload in sorted(found.items()):
            if payload:  # an empty retained message is a withdrawn release
                print(f"{topic}: {_peek(payload)}")
    return 0


def _peek(payload: bytes) -> str:
    """Name, version and groups of a release without its signature checked."""
    import cbor2

    try:
        outer = cbor2.loads(payload)
        body = cbor2.loads(cbor2.loads(outer[1]).value[2])
        manifest = json.loads(body[3])
        return (
            f"{manifest['name']} {manifest['version']} groups={','.join(manifest['groups'])} "
            f"sha256={manifest['sha256'][:12]} ({len(payload)} bytes; signature not checked)"
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, cbor2.CBORDecodeError):
        return f"not a model release ({len(payload)} bytes)"
