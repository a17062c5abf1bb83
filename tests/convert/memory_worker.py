"""Run one conversion (convert_hf_checkpoint.py arguments) and print, as JSON, how much the
process's anonymous memory grew: a sampling thread reads RssAnon from /proc/self/status.

Anonymous memory, not RSS: the memory-mapped safetensors pages a conversion reads are file-backed
(the kernel drops them at will) and would count the whole input in RSS. The baseline is taken
after every import and the world-of-one setup, right before the conversion.

    python -m tests.convert.memory_worker hf-to-megamoe --hf-dir ... --output ...
"""

import json
import resource
import sys
import threading
import time


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    def __init__(self, period: float = 0.002):
        super().__init__(daemon=True)
        self.period, self.peak, self.stop = period, rss_anon(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.period)


def main(argv):
    from megamoe import convert, parallel
    from megamoe.formats import mcore_stream  # noqa: F401  (imports before the baseline)

    parallel.world_of_one(0)
    base = rss_anon()
    sampler = PeakSampler()
    sampler.start()
    rc = convert.main(argv)
    sampler.stop.set()
    sampler.join()
    peak = max(sampler.peak, rss_anon())
    print(
        json.dumps(
            {
                "rc": rc,
                "baseline": base,
                "peak": peak,
                "growth": peak - base,
                "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
