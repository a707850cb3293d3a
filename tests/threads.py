"""Running requests from several threads at once in tests."""
import threading


def in_threads(fn, args_list, timeout=60.0):
    """Run ``fn(*args)`` for each args in threads started together; results (or exceptions)."""
    out, start = [None] * len(args_list), threading.Barrier(len(args_list))

    def run(i):
        start.wait()
        try:
            out[i] = fn(*args_list[i])
        except BaseException as e:        # reported to the test
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,), name=f"request-{i}") for i in range(len(args_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    return out
