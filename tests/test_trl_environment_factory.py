"""Any sdpo-gym environment inside a plain `trl.GRPOTrainer`, through `sdpo_envs.environment_factory`."""

from __future__ import annotations

import inspect
import re
import socket
from pathlib import Path

import pytest
from datasets import Dataset
from transformers.utils import get_json_schema
from trl import GRPOConfig, GRPOTrainer
from trl.chat_template_utils import qwen3_chat_template

import sdpo_envs
from sdpo_core.testing import fit_answers, tiny_model, tiny_tokenizer
from sdpo_envs import TRLEnvironment, environment_factory
from sdpo_envs.testing import FakeEnvironment, registered_plugin
from sdpo_envs.trl_environment import NO_SUBMISSION_TEXT, OVER_TEXT, default_instructions


class Retry(FakeEnvironment):
    """The fake environment (reward 1 when the completion contains the answer), multi-turn."""

    def respond(self, task, history):
        return f"{history[-1].feedback.text} Try again."


def tools_of(obj) -> list[str]:
    """The methods TRL turns into tools: public functions of the class other than reset and get_reward."""
    return sorted(name for name, _ in inspect.getmembers(type(obj), predicate=inspect.isfunction)
                  if not name.startswith("_") and name not in ("reset", "get_reward"))


# --------------------------------------------------------------------------------- the objects alone
def test_the_factory_takes_no_arguments_and_its_objects_have_one_tool():
    factory = environment_factory(Retry(), max_turns=3)
    one, two = factory(), factory()
    assert isinstance(one, TRLEnvironment)
    assert one is not two
    assert one.environment is two.environment
    assert type(one).__name__ == "Retry"  # TRL logs the reward as rewards/<class name>/mean
    assert tools_of(one) == ["submit"]
    schema = get_json_schema(one.submit)["function"]
    assert schema["name"] == "submit"
    assert schema["parameters"]["properties"]["answer"]["type"] == "string"
    assert schema["parameters"]["required"] == ["answer"]


def test_an_episode_through_reset_submit_and_get_reward():
    env = environment_factory(Retry(), max_turns=3)()
    assert env.reset(prompt=[{"role": "user", "content": "6 x 7?"}], answer="42") == "\n\n" + default_instructions(3)
    assert env.get_reward() == 0.0
    assert env.last_feedback == NO_SUBMISSION_TEXT
    assert env.submit("41") == "The completion does not contain the answer (2 characters). Try again."
    assert env.last_feedback == "The completion does not contain the answer (2 characters)."
    assert env.get_reward() == 0.0
    assert env.submit("42") == "Correct. The episode is over."
    assert (env.get_reward(), env.last_feedback, len(env.episode.history)) == (1.0, "", 2)
    assert env.submit("42") == OVER_TEXT
    env.reset(prompt="again", answer="1")  # a pooled object starts afresh
    assert env.episode.history == []
    assert env.get_reward() == 0.0


def test_the_teacher_reads_the_objects_last_feedback_and_last_answer():
    from sdpo_envs import InvalidResultError
    from sdpo_envs.feedback_channel import read_environment_feedback

    env = environment_factory(Retry(), max_turns=3)()
    env.reset(prompt="p", answer="42")
    assert env.last_answer is None
    env.submit("41")
    assert env.last_answer == "41"

    class Silent:
        pass

    class Wrong:
        last_feedback = ("a", "tuple")

    assert read_environment_feedback([env, Silent()]) == [
        "The completion does not contain the answer (2 characters).", ""]
    with pytest.raises(InvalidResultError, match="environment 'Wrong' \\(row 1\\): last_feedback is tuple"):
        read_environment_feedback([env, Wrong()])


def test_the_last_turn_says_the_episode_is_over_and_keeps_the_feedback():
    env = environment_factory(Retry(), max_turns=2, turn_discount=0.5)()
    env.reset(prompt="p", answer="42")
    env.submit("1")
    closing = env.submit("2")
    assert closing == ("The completion does not contain the answer (2 characters).\n\nNo attempts left. "
                       "The episode is over.")
    assert env.get_reward() == 0.0
    env.reset(prompt="p", answer="42")
    env.submit("1")
    env.submit("42")
    assert env.get_reward() == 0.5  # the discount: 1 x 0.5 ** (2 - 1)


def test_a_row_without_prompt_gets_the_environments_prompt():
    class Asks(FakeEnvironment):
        def prompt(self, task):
            return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {task['answer']}."}]

    env = environment_factory(Asks(), instructions="Call submit.")()
    assert env.reset(answer="hi") == "Be brief.\n\nSay hi.\n\nCall submit."
    quiet = environment_factory(Asks(), instructions="")()
    assert quiet.reset(prompt="p", answer="hi") is None


def test_a_failed_attempt_is_recorded_not_raised():
    env = environment_factory(Retry(error_reward=None), max_turns=3)()
    env.reset(prompt="p", answer="42")
    assert env.submit("FAIL") == "Your answer could not be checked. The episode is over."
    assert env.get_reward() is None
    assert env.episode.result.feedback.details["error"] == "RuntimeError: fake failure"


def test_by_name_and_bad_arguments():
    class Plugin:
        @staticmethod
        @sdpo_envs.hookimpl
        def register_environments(register):
            register("retry", Retry)
            register("single", FakeEnvironment)

    with registered_plugin(Plugin(), name="trl-factory-test"):
        env = environment_factory("retry", max_turns=2, answer_column="solution")()
        assert (env.environment.max_turns, env.environment.answer_column, type(env).__name__) == (2, "solution",
                                                                                                   "retry")
        with pytest.raises(ValueError, match=re.escape("environment 'single' cannot run multi-turn episodes "
                                                       "(max_turns=3)")):
            environment_factory("single", max_turns=3)
    with pytest.raises(ValueError, match="environment 'Retry': max_turns must be at least 1, got 0"):
        environment_factory(Retry(), max_turns=0)
    with pytest.raises(TypeError, match=r"keyword arguments \['answer_column'\] configure an environment built by "
                                        "name; 'Retry' is already built"):
        environment_factory(Retry(), answer_column="x")
    with pytest.raises(TypeError, match="expected an environment name or an Environment, got int"):
        environment_factory(3)
    with pytest.raises(RuntimeError, match=r"submit\(\) before reset\(\)"):
        environment_factory(Retry())().submit("x")


# ------------------------------------------------------------------------------ a real GRPOTrainer run
SUBMIT_FIVE = '<tool_call>\n{"name": "submit", "arguments": {"answer": "5"}}\n</tool_call><|im_end|>'


def _tool_calling_setup():
    """The tiny model with TRL's Qwen3 template, taught to call `submit("5")`; two rows (one it solves, one it
    fails) and a factory of 2-turn episodes of the `Retry` environment."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = qwen3_chat_template  # TRL parses tool calls only for chat templates it knows
    model = tiny_model(tokenizer, seed=0)
    model.config.max_position_embeddings = 2048  # the prompt carries the tool schema: ~700 tokens
    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
            {"prompt": [{"role": "user", "content": "What is 6 + 2?"}], "answer": "8"}]
    factory = environment_factory(Retry(), max_turns=2)
    probe = factory()
    contexts = []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"][0]["content"] + probe.reset(**row)}]
        contexts.append(messages)
        call = {"type": "function", "function": {"name": "submit", "arguments": {"answer": "5"}}}
        contexts.append([*messages, {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "name": "submit", "content": probe.submit("5")}])
    # a random model never writes a tool call: fit it to answer every context with `submit("5")`
    fit_answers(model, tokenizer, [
        (tokenizer.apply_chat_template(messages, tools=[probe.submit], add_generation_prompt=True, tokenize=False),
         SUBMIT_FIVE) for messages in contexts], max_steps=300, target_loss=0.005)
    return model, tokenizer, rows, factory


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection is recorded and refused."""
    attempts: list[object] = []

    def refuse(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access in a test: {address}")
        return real_connect(self, address, *args)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    return attempts


@pytest.mark.slow
def test_a_plain_grpo_trainer_runs_multi_turn_episodes(no_network, tmp_path):
    model, tokenizer, rows, factory = _tool_calling_setup()

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=320, max_tool_calling_iterations=3, max_steps=1, learning_rate=1e-3,
                      temperature=0.5, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
                      disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          environment_factory=factory)  # no reward_funcs: the episodes' get_reward is the reward
    trainer.train()

    logged = trainer.state.log_history[0]
    episodes = trainer.environments
    rewards = [e.get_reward() for e in episodes]
    assert len(episodes) == 8
    assert logged["rewards/Retry/mean"] == pytest.approx(sum(rewards) / len(rewards))
    assert logged["tools/call_frequency"] > 0
    by_answer = {answer: [e for e in episodes if e.episode.task["answer"] == answer] for answer in ("5", "8")}
    solved = [e for e in by_answer["5"] if e.episode.history]
    assert solved, "no episode of the 2 + 3 row submitted anything"
    assert all(e.get_reward() == 1.0 and e.last_feedback == "" for e in solved)
    failed = [e for e in by_answer["8"] if e.episode.history]
    assert failed, "no episode of the 6 + 2 row submitted anything"
    for e in failed:
        assert e.get_reward() == 0.0
        assert e.last_feedback == "The completion does not contain the answer (1 characters)."
        assert len(e.episode.history) <= 2
    assert any(len(e.episode.history) == 2 for e in failed), "no episode got a second turn after the feedback"
    assert no_network == []


def test_the_documented_example_runs(no_network, tmp_path, monkeypatch):
    import sdpo_math

    docs = (Path(__file__).resolve().parents[1] / "docs" / "environments.md").read_text()
    section = docs[docs.index("## Inside a plain TRL `GRPOTrainer`"):]
    example = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    monkeypatch.chdir(tmp_path)
    printed: list[object] = []
    with registered_plugin(sdpo_math, "math"):
        exec(compile(example, "docs/environments.md", "exec"), {"print": printed.append})
    assert len(printed) == 1
    assert isinstance(printed[0], float)
    assert no_network == []


@pytest.mark.slow
def test_sdpo_reads_the_feedback_and_final_answers_from_the_environment_objects(no_network, tmp_path, monkeypatch):
    """SDPOTrainer(environment_factory=...): the environment objects' `last_feedback` and `last_answer` are what
    the teacher prompts are built from, for a few real steps of the tiny model."""
    import sdpo_core.trainer as trainer_module
    from sdpo_core.config import SDPOConfig
    from sdpo_core.trainer import SDPOTrainer

    model, tokenizer, rows, factory = _tool_calling_setup()

    built = []
    real_build = trainer_module.build_teacher_batch

    def build(prompts, completions, rewards, feedbacks, **kwargs):
        built.append((list(completions), list(rewards), list(feedbacks)))
        return real_build(prompts, completions, rewards, feedbacks, **kwargs)

    monkeypatch.setattr(trainer_module, "build_teacher_batch", build)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=320, max_tool_calling_iterations=3, max_steps=2, learning_rate=1e-3,
                      temperature=0.5, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
                      disable_tqdm=True, dataloader_num_workers=0)
    trainer = SDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          environment_factory=factory, sdpo_config=SDPOConfig())
    trainer.train()

    assert len(built) == 2
    episodes = trainer.environments  # the last batch's
    demonstrations, rewards, feedbacks = built[-1]
    assert rewards == [e.get_reward() for e in episodes]
    assert feedbacks == [e.last_feedback for e in episodes]
    for episode, demonstration in zip(episodes, demonstrations, strict=True):
        if episode.last_answer is not None:
            assert demonstration == episode.last_answer  # the submitted answer, not the tool-calling transcript
    solved = [e for e in episodes if e.get_reward() == 1.0]
    failed = [e for e in episodes if e.episode.history and e.get_reward() == 0.0]
    assert solved, "no episode solved 2 + 3"
    assert failed, "no episode submitted a wrong answer to 6 + 2"
    assert {e.last_answer for e in solved} == {"5"}
    assert {e.last_feedback for e in failed} == {"The completion does not contain the answer (1 characters)."}
    logged = trainer.state.log_history[-2]
    assert logged["sdpo/demo_row_fraction"] > 0
    assert logged["sdpo/feedback_row_fraction"] > 0
    assert no_network == []
