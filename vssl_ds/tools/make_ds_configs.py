"""Write ds_configs/*.json from the typed config presets (engine/ds_config.py). Never edit those files by hand.

    python tools/make_ds_configs.py            # rewrite them
    python tools/make_ds_configs.py --check    # exit 1 if any file drifted from the generator
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..engine.ds_config import PRESETS, preset_config



def render(name: str) -> str:
    return json.dumps(preset_config(name), indent=2, sort_keys=True) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "ds_configs"))
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    out = Path(args.out)
    drifted = []
    for name in PRESETS:
        path = out / f"{name}.json"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                drifted.append(str(path))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if drifted:
        print("out of date (run python tools/make_ds_configs.py): " + ", ".join(drifted), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
