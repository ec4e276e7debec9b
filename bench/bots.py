"""Issue 14's bot figures: how well the User-Agent classes match maintained data, and what a
classification costs. Pure (no proxy): the classifier is what decides.

    .venv/bin/python bench/bots.py [--before /work/main]

- recall: every `instances` example of the crawler-user-agents package, by tag: classed as the
  tag's class, and refused (403) with the production setting `bots: {block: [scanner, bad]}`;
- browsers: the User-Agents of ua-parser's own tests (Debian's uap-core: tests/test_ua.yaml, less
  the ones ua-parser itself calls a Spider, and test_resources' Firefox and Opera Mini lists),
  how many are classed other than `browser`, and how many would be refused;
- cost: µs per classification of a User-Agent not seen before (the classifier remembers the
  last 8192), and of one seen before.
`--before DIR`: the same figures for the classifier of another checkout (e.g. main) beside ours.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from addons.config import DEFAULT_CRS, parse_config  # noqa: E402
from addons.shield.botdata import PRECEDENCE, TAG_CLASSES, crs_scanner_names  # noqa: E402
from addons.shield.bots import Classifier  # noqa: E402

UAP = Path("/usr/share/uap-core")
PRODUCTION = "pools: {a: {origins: ['http://127.0.0.1:1']}}\nshield:\n  bots: {block: [scanner, bad]}\n"


def package_examples() -> list[tuple[str, str]]:
    """(tag, User-Agent) for every example of every tagged entry (an entry with two tags counts
    under both)."""
    from crawleruseragents import CRAWLER_USER_AGENTS_DATA
    return [(tag, ua) for e in CRAWLER_USER_AGENTS_DATA for tag in e.get("tags", ()) for ua in e.get("instances", ())]


def browser_examples() -> list[str]:
    import ua_parser
    out = []
    tests = UAP / "tests" / "test_ua.yaml"
    if tests.exists():
        for case in yaml.safe_load(tests.read_text())["test_cases"]:
            ua = case["user_agent_string"]
            device = ua_parser.parse_device(ua)
            if device is None or device.family != "Spider":
                out.append(ua)
    for name in ("firefox_user_agent_strings.yaml", "opera_mini_user_agent_strings.yaml"):
        path = UAP / "test_resources" / name
        if path.exists():
            out += [c["user_agent_string"] for c in yaml.safe_load(path.read_text())["test_cases"]]
    return list(dict.fromkeys(out))


def old_classifier(checkout: Path):
    """The classify() of another checkout's addons/shield/bots.py (it imports no other addon)."""
    spec = importlib.util.spec_from_file_location("bots_before", checkout / "addons/shield/bots.py")
    module = sys.modules["bots_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.classify, module.classify.__wrapped__


def cost(fn, uas: list[str], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for ua in uas:
            fn(ua)
        best = min(best, (time.perf_counter() - start) / len(uas))
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", type=Path, help="a checkout whose classifier to compare (e.g. /work/main)")
    args = p.parse_args()
    names = crs_scanner_names(DEFAULT_CRS)
    classifier = Classifier(names)
    table = dict(parse_config(PRODUCTION).shield.bots.actions)
    after = ("after", classifier.classify, classifier._classify, lambda kind: table[kind] == "block")
    runs = [after]
    if args.before:
        classify, uncached = old_classifier(args.before)
        runs.insert(0, ("before", classify, uncached, lambda kind: kind in ("scanner", "bad")))
    print(f"CRS scanner names read: {len(names)} from {DEFAULT_CRS}")

    examples = package_examples()
    tags = sorted({t for t, _ in examples}, key=lambda t: -sum(1 for x, _ in examples if x == t))
    print("\ncrawler-user-agents examples by tag: classed as the tag's class / refused with block: [scanner, bad]")
    head = f"{'tag':<20}{'examples':>9}"
    for name, *_ in runs:
        head += f"{name + ' classed':>16}{name + ' refused':>16}"
    print(head)
    for tag in tags:
        uas = [ua for t, ua in examples if t == tag]
        want = TAG_CLASSES.get(tag, "unknown")
        row = f"{tag:<20}{len(uas):>9}"
        for name, classify, _, refused in runs:
            kinds = [classify(ua) for ua in uas]
            row += f"{sum(k == want for k in kinds):>16}{sum(refused(k) for k in kinds):>16}"
        print(row + ("" if tag in TAG_CLASSES else "   (class: unknown)"))
    got = Counter(classifier.classify(ua) for t, ua in examples if t == "search-engine")
    print(f"search-engine examples, after: {dict(got)}")

    browsers = browser_examples()
    print(f"\nua-parser test User-Agents that are not Spiders (Debian uap-core {UAP}): {len(browsers)}")
    for name, classify, _, refused in runs:
        kinds = Counter(classify(ua) for ua in browsers)
        wrong = sum(n for k, n in kinds.items() if k != "browser")
        print(f"  {name}: not `browser` {wrong} ({wrong / len(browsers):.1%}); refused {sum(n for k, n in kinds.items() if refused(k))}; "
              f"classes {dict(kinds.most_common())}")

    mix = browsers + [ua for _, ua in examples]
    print(f"\ncost per classification, µs (best of 3 over {len(mix)} User-Agents)")
    for name, classify, uncached, _ in runs:
        print(f"  {name}: not seen before {cost(uncached, mix):.1f}; browsers only {cost(uncached, browsers):.1f}; "
              f"seen before {cost(classify, mix[:8000]):.2f}")
    print(f"  after, the package's own matcher (crawleruseragents.is_crawler, yes/no only): "
          f"{cost(__import__('crawleruseragents').is_crawler, mix):.1f}")
    print(f"classes in precedence order: {', '.join(PRECEDENCE)}")


if __name__ == "__main__":
    main()
