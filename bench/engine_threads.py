"""The engine process's threads: loaded, idle after a first answer, and with one answer
generating while six more wait in the engine (a serving engine's thread count does not grow
with the requests it holds).

    python bench/engine_threads.py [MODEL_DIR]     # default: ./tiny-models/bench-llama (built if missing)
"""

import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_contract import GenerationSettings  # noqa: E402
from engine_process import EngineProcess  # noqa: E402

WAITING = 6


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def main() -> None:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tiny-models" / "bench-llama"
    if not model.exists():
        from tests.tiny_models import build_bench_llama
        build_bench_llama(model)
    engine = EngineProcess.start(str(model), device="cpu")
    threads = lambda: len(os.listdir(f"/proc/{engine.pid}/task"))  # noqa: E731
    try:
        print(f"loaded, before any answer: {threads()} threads")
        with engine.stream(ask("first"), GenerationSettings(max_new_tokens=3)) as stream:
            list(stream)
        time.sleep(0.5)
        print(f"idle after a first answer: {threads()} threads")
        running = engine.stream(ask("long"), GenerationSettings(max_new_tokens=4000, min_new_tokens=4000))

        def wait_in_the_engine():
            with engine.stream(ask("waiting"), GenerationSettings(max_new_tokens=3)) as waiting:
                list(waiting)
        callers = [threading.Thread(target=wait_in_the_engine) for _ in range(WAITING)]
        for caller in callers:
            caller.start()
        time.sleep(2.0)  # (all have reached the engine)
        print(f"1 answer generating, {WAITING} waiting in the engine: {threads()} threads")
        running.close()
        for caller in callers:
            caller.join(60)
        time.sleep(0.5)
        print(f"after them: {threads()} threads")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
