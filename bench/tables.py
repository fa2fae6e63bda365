"""The Markdown rendering of a results dict (bench/results/*.md)."""

from __future__ import annotations

from typing import Any

import load

SERVER_ORDER = ("fcgidaemon", "flup6", "uwsgi", "php-fpm", "libfcgi-c", "nginx-return",
                "apache-static")
FRONTEND_ORDER = ("nginx", "nginx-keepconn", "apache", "apache-reuse")
CASE_TITLES = {"hello": "hello: GET, 13-byte body", "64k": "64k: GET, 65,536-byte body",
               "post-1m": "post-1m: POST of 1 MiB, the app reads it and answers its length"}


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _mmm(stat: dict[str, float] | None, digits: int = 1) -> str:
    if not stat:
        return "–"
    return f"{_num(stat['median'], digits)} ({_num(stat['min'], digits)}–{_num(stat['max'], digits)})"


def _med(stat: dict[str, float] | None, digits: int = 2) -> str:
    return "–" if not stat else _num(stat["median"], digits)


def _load(stat: dict[str, float] | None) -> str:
    return "–" if not stat else f"{stat['median']:.2f}, {stat['max']:.2f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def render(results: dict[str, Any]) -> str:
    parts = [header(results)]
    if "throughput" in results:
        parts.append(throughput(results["throughput"]))
    if "reload" in results:
        parts.append(reload(results["reload"]))
    if "memory" in results:
        parts.append(memory(results["memory"]))
    if "micro" in results:
        parts.append(micro(results["micro"]))
    for section, message in results.get("failed_sections", {}).items():
        parts.append(f"**{section} failed:** `{message}`\n")
    return "\n".join(parts)


def header(results: dict[str, Any]) -> str:
    env, s = results["environment"], results["settings"]
    m, v = env["machine"], env["versions"]
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    return (f"# fcgidaemon benchmark, {env['date']}\n\n"
            f"- machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, "
            f"kernel {m['kernel']}\n"
            f"- versions: {versions}\n"
            f"- settings: {s['workers']} workers per server, {s['rounds']} round(s) of "
            f"{s['duration']:g} s per server, servers alternating within each round; "
            f"`wrk -t{s['threads']} -c{s['connections']} --latency`; "
            f"figures are median (min–max) over the rounds"
            f"{'; QUICK run (smoke test)' if s.get('quick') else ''}\n")


def _table(title: str, columns: list[str]) -> list[str]:
    """A heading and a table's head; a column named with a trailing '>' holds numbers
    (right-aligned)."""
    names = " | ".join(c.removesuffix(">") for c in columns)
    aligns = " | ".join("---:" if c.endswith(">") else "---" for c in columns)
    return [title, f"| {names} |", f"| {aligns} |"]


def throughput(section: dict[str, Any]) -> str:
    summary = section["summary"]
    lines = ["## Throughput\n",
             "Ratios are to fcgidaemon behind the same front end (req/s: higher is better; "
             "CPU: lower is better). CPU is user+system seconds of the server's own processes "
             "per 10,000 requests; front-end CPU is nginx's or Apache's. Errors are wrk's "
             "non-2xx responses plus socket errors (timeouts included), summed over the rounds. 'Other "
             "load' is the CPU (in cores, median, max) that processes outside the benchmark used "
             "during the runs: the 2 cores are shared with other work on this machine, and a "
             "high figure marks a figure to distrust.\n"]
    for case in load.CASES:
        entries = [e for e in summary if e["case"] == case]
        if not entries:
            continue
        lines += _table(f"### {CASE_TITLES.get(case, case)}\n",
                        ["front end", "server", "req/s>", "× req/s>", "p50 ms>", "p99 ms>", "errors>",
                         "CPU s/10k req>", "× CPU>", "front-end CPU s/10k>", "other load>"])
        entries.sort(key=lambda e: (FRONTEND_ORDER.index(e["frontend"]),
                                    SERVER_ORDER.index(e["server"])))
        for e in entries:
            failed = f" ({e['failed_runs']} failed)" if e["failed_runs"] else ""
            lines.append(f"| {e['frontend']} | {e['server']} | {_mmm(e['rps'])}{failed} "
                         f"| {_ratio(e['rps_ratio'])} | {_med(e['p50_ms'])} | {_med(e['p99_ms'])} "
                         f"| {e['errors']:,} | {_med(e['cpu_per_10k'])} | {_ratio(e['cpu_ratio'])} "
                         f"| {_med(e['fe_cpu_per_10k'])} | {_load(e['other_cores'])} |")
        lines.append("")
    return "\n".join(lines)


def reload(section: dict[str, Any]) -> str:
    lines = _table(f"## Reload (fcgidaemon, {section['workers']} workers, app importing "
                   f"{section['modules']} synthetic modules, {section['rounds']} reloads each)\n",
                   ["variant", "SIGHUP → \"reload complete\" s>", "daemon's own figure s>",
                    "worker spawn s median (min–max)>", "other load>", "first start s (other load)>"])
    for name, data in section["variants"].items():
        s = data.get("summary") or {}
        lines.append(f"| {name} | {_mmm(s.get('reload_s'), 3)} | {_mmm(s.get('logged_s'), 3)} "
                     f"| {_mmm(s.get('spawn_s'), 3)} | {_load(s.get('other_cores'))} "
                     f"| {_num(data.get('first_start_s'), 2)} "
                     f"({_num(data.get('first_start_other_cores'), 2)}) |")
    return "\n".join(lines) + "\n"


def memory(section: dict[str, Any]) -> str:
    lines = _table(f"## Memory (fcgidaemon, {section['workers']} workers, app holding ~50 MB of "
                   f"Python objects, after {section['requests']:,} requests)\n",
                   ["variant", "total PSS MB>", "worker PSS MB>", "worker USS MB>", "worker RSS MB>",
                    "manager PSS MB>", "worker PSS at start MB>", "requests per worker",
                    "other load>"])
    for name, data in section["variants"].items():
        a, b = data["after"], data["before"]
        counts = [n for k, n in data["requests_per_worker"].items() if k.isdigit()]
        spread = f"{min(counts)}–{max(counts)} over {len(counts)}" if counts else "–"
        lines.append(f"| {name} | {_num(a['total_pss_mb'])} | {_mmm(a['worker_pss_mb'])} "
                     f"| {_mmm(a['worker_uss_mb'])} | {_med(a['worker_rss_mb'], 1)} "
                     f"| {_num(a['manager']['pss'])} | {_med(b['worker_pss_mb'], 1)} | {spread} "
                     f"| {_num(data.get('other_cores'), 2)} |")
    if "footprint" in section:
        lines += ["", footprint(section["footprint"])]
    if "sharing" in section:
        lines += ["", sharing(section["sharing"])]
    return "\n".join(lines) + "\n"


def footprint(section: dict[str, Any]) -> str:
    lines = _table(f"### Per-worker memory of each server: hello app, {section['workers']} workers, "
                   f"after {section['requests']:,} requests\n",
                   ["server", "worker PSS MB>", "worker USS MB>", "worker RSS MB>", "parent PSS MB>",
                    "total PSS MB>", "answers", "other load>"])
    for name in (*SERVER_ORDER, "fcgidaemon --preload hello"):
        data = section["servers"].get(name)
        if data is None:
            continue
        a = data["after"]
        answers = ", ".join(f"{n:,} × {k}" for k, n in data["answers"].items())
        lines.append(f"| {name} | {_mmm(a['worker_pss_mb'])} | {_mmm(a['worker_uss_mb'])} "
                     f"| {_med(a['worker_rss_mb'], 1)} | {_num(a['manager']['pss'])} "
                     f"| {_num(a['total_pss_mb'])} | {answers} | {_num(data.get('other_cores'), 2)} |")
    return "\n".join(lines)


def sharing(section: dict[str, Any]) -> str:
    lines = _table(f"### --share-stdlib: {section['app']} (30 standard-library modules), "
                   f"{section['workers']} workers, {section['requests']:,} requests per generation; "
                   "the generation started with the daemon, then the next (SIGHUP)\n",
                   ["--share-stdlib", "generation", "worker USS MB>", "worker PSS MB>",
                    "manager PSS MB>", "total PSS MB>", "answers", "other load>"])
    for share, data in section["variants"].items():
        for label, snap, answers in (("first", data["first"], data["answers"][0]),
                                     ("after SIGHUP", data["second"], data["answers"][1])):
            told = ", ".join(f"{n:,} × {k}" for k, n in answers.items())
            lines.append(f"| {share} | {label} | {_mmm(snap['worker_uss_mb'])} "
                         f"| {_mmm(snap['worker_pss_mb'])} | {_num(snap['manager']['pss'])} "
                         f"| {_num(snap['total_pss_mb'])} | {told} | {_num(data.get('other_cores'), 2)} |")
    return "\n".join(lines)


def micro(section: dict[str, Any]) -> str:
    lines = _table("## Micro-benchmark: fcgidaemon's per-request path with no front end "
                   "(`bench/micro.py`: kept connection on a socketpair; hello-newconn: a new "
                   "loopback TCP connection per request)\n",
                   ["case", "req/s>", "server CPU µs/request>"])
    for case, data in section["cases"].items():
        lines.append(f"| {case} | {_mmm(data['rps'])} | {_mmm(data['cpu_us_per_request'])} |")
    if section.get("other_cores") is not None:
        lines += ["", f"Load from outside the benchmark during this section: "
                      f"{section['other_cores']:.2f} cores."]
    prof = section.get("profile")
    if prof:
        lines += ["", f"cProfile of the hello case ({prof['requests']:,} requests, CPU time; "
                      "shares are of total profiled CPU time, which cProfile inflates for "
                      "Python-level calls relative to C calls):\n",
                  *_table("", ["#>", "function (own time)", "calls>", "own s>", "own share>",
                               "cum share>"])[1:]]
        for i, row in enumerate(prof["by_own_time"], 1):
            lines.append(f"| {i} | `{row['function']}` | {row['ncalls']:,} | {row['tottime_s']:.3f} "
                         f"| {row['own_share']:.1%} | {row['cum_share']:.1%} |")
    return "\n".join(lines) + "\n"
