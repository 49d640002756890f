"""Shared fixtures.  Tests import the *installed* package (``make test``
installs it); engine tests need the default model (``make model``)."""

import gc
import os

import pytest

# Triton kernels run under the interpreter on CPU; it must be chosen before
# anything (vLLM, through torch._dynamo) imports triton.language.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def model_path() -> str:
    from kvcompress_vllm.model import default_model_path

    path = default_model_path()
    if not (path / "config.json").exists():
        pytest.fail(f"default model missing at {path}: run `make model`")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(model_path):
    """The default model's Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def pytest_configure(config):
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


#: nodeid -> the ``Background`` job of a selected test marked ``background``.
_BACKGROUND: dict = {}
#: Tests marked ``background`` whose jobs wait for a slot, in test order.
_QUEUED: list = []
#: At most this many jobs run at once, for memory: the peak-memory child
#: holds a 4.3 GB pool, a benchmark's quick form 0.6-0.9 GB, and the engine
#: tests beside them must still pass vLLM's memory check.
BACKGROUND_AT_ONCE = 4


def _is_background(item) -> bool:
    return item.get_closest_marker("background") is not None


def pytest_collection_modifyitems(items):
    """Tests marked ``background`` run last (in their order), so that their
    jobs have the whole session's idle CPU time."""
    items.sort(key=_is_background)  # stable


def pytest_collection_finish(session):
    """Queue the job of every selected test marked ``background(make_cmd)``
    (``subproc.Background``): engine-free commands that run beside the other
    tests, on CPU time those leave idle, ``BACKGROUND_AT_ONCE`` at a time."""
    if session.config.option.collectonly:
        return
    _QUEUED[:] = [item for item in session.items if _is_background(item)]
    _start_queued()


def _start_queued() -> None:
    """Start queued jobs while fewer than ``BACKGROUND_AT_ONCE`` run."""
    running = sum(job.proc.poll() is None for job in _BACKGROUND.values())
    while _QUEUED and running < BACKGROUND_AT_ONCE:
        item = _QUEUED.pop(0)
        try:
            _BACKGROUND[item.nodeid] = _start_background(item)
        except pytest.skip.Exception:
            continue  # the test skips, saying why, when it asks for its job
        running += 1


def pytest_runtest_logfinish():
    _start_queued()  # slots of the jobs that ended during this test


def _start_background(item):
    """``subproc.Background`` of ``item``'s ``background(make_cmd)`` mark."""
    from subproc import Background

    return Background(item.get_closest_marker("background").args[0])


def pytest_sessionfinish(session):
    for job in _BACKGROUND.values():
        job.remove()
    _BACKGROUND.clear()
    _QUEUED.clear()


@pytest.fixture
def background(request):
    """The test's ``Background`` job: started from the queue, or now if it is
    still queued (the mark's ``make_cmd`` may skip the test)."""
    job = _BACKGROUND.pop(request.node.nodeid, None)
    if job is None:
        if request.node in _QUEUED:
            _QUEUED.remove(request.node)
        job = _start_background(request.node)
    request.addfinalizer(job.remove)
    return job


ENGINE_DEFAULTS = dict(
    enforce_eager=True,
    seed=0,
    max_model_len=4096,
    kv_cache_memory_bytes=384 << 20,
    max_num_batched_tokens=1024,  # long prompts are prefilled in chunks
    max_num_seqs=64,
)


class Engine:
    """An in-process vLLM engine (EngineCore in this process, so tests can
    look at the scheduler); workers are separate processes as always."""

    def __init__(self, model: str, **kwargs):
        from vllm import LLM

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = LLM(model, **{**ENGINE_DEFAULTS, **kwargs})
        self.engine = self.llm.llm_engine
        self.core = self.engine.engine_core.engine_core
        self.tokenizer = self.llm.get_tokenizer()

    @property
    def scheduler(self):
        return self.core.scheduler

    def free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    def rank_page_tables(self) -> list[tuple[int, dict]]:
        """Per worker rank (``collective_rpc``; needs
        ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``): its KV heads per layer, and
        request id -> (pages in use, blocks) of its page table."""

        def read(worker):
            from kvcompress_vllm.worker.state import get_state

            table = get_state().table
            return table.num_kv_heads, {rid: (table.pages_in_use(req), list(req.blocks))
                                        for rid, req in table.requests.items()}

        return self.llm.collective_rpc(read)

    def generate(self, prompts, params):
        """``prompts``: list of str or list of token-id lists."""
        from vllm.inputs import TokensPrompt

        inputs = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        return self.llm.generate(inputs, params, use_tqdm=False)

    def run_until_done(self, max_steps=100_000):
        outputs = {}
        for _ in range(max_steps):
            if not self.engine.has_unfinished_requests():
                return outputs
            for out in self.engine.step():
                if out.finished:
                    outputs[out.request_id] = out
        raise AssertionError("engine did not finish")

    def shutdown(self):
        if self.engine is not None:
            self.engine.engine_core.shutdown()
            # The core holds the KV cache and the weights: let them go now,
            # not when the module's fixtures end (memory-bound tests follow).
            self.engine = self.llm = self.core = None
            gc.collect()


def skip_where_prefix_caching_is_refused(err: BaseException) -> None:
    """Skip the test if ``err`` is the engine refusing prefix caching on a CPU
    where requests would use two page layouts (``PageLayouts.check_prefix_caching``)."""
    import traceback

    text = "".join(traceback.format_exception(err))
    if "--enable-prefix-caching needs every request" in text:
        pytest.skip(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def engine_factory(model_path):
    engines = []

    def make(**kwargs) -> Engine:
        eng = Engine(model_path, **kwargs)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown()
