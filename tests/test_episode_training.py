"""Multi-turn SDPO on the training path: episodes played through TRL's rollout_func, their masks, the teacher's
hindsight context, failures, and the multi-turn evaluation."""

from __future__ import annotations

import re
import time

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig
from trl.chat_template_utils import qwen3_chat_template

from sdpo_core.app.episode_eval import conversation, evaluate_episodes, pass_within_turns, play_episodes
from sdpo_core.app.evaluation import evaluate_model
from sdpo_core.config import SDPOConfig
from sdpo_core.episode_rollout import check_rollout_arguments, observation_ids, observation_suffix_text
from sdpo_core.episode_teacher import assistant_turn_spans, hindsight_demonstrations
from sdpo_core.teacher_prompt import build_teacher_batch
from sdpo_core.testing import fit_answers, tiny_model, tiny_tokenizer
from sdpo_core.trainer import SDPOTrainer
from sdpo_envs import Feedback
from sdpo_envs.testing import FakeEnvironment

OBSERVATION = "The completion does not contain the answer (1 characters). Try again."
QUESTIONS = {"What is 2 + 3?": "5", "What is 6 + 2?": "8", "What is 1 + 2?": "3"}


class Retry(FakeEnvironment):
    """The fake environment (reward 1 when the completion contains the answer), multi-turn."""

    def respond(self, task, history):
        return f"{history[-1].feedback.text} Try again."


def retry(max_turns: int = 3, **kwargs) -> Retry:
    env = Retry(**kwargs)
    env.configure_episodes(max_turns=max_turns)
    return env


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------- pure pieces
def test_the_observation_suffix_is_what_the_template_puts_between_two_assistant_turns():
    chatml = ("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nMARK<|im_end|>\n<|im_start|>user\nobs<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert observation_suffix_text(chatml, "MARK", ["<|im_end|>"]) == (
        "\n<|im_start|>user\nobs<|im_end|>\n<|im_start|>assistant\n")
    llama3 = ("<|start_header_id|>assistant<|end_header_id|>\n\nMARK<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nobs<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert observation_suffix_text(llama3, "MARK", ["<|end_of_text|>", "<|eot_id|>"]) == (
        "<|start_header_id|>user<|end_header_id|>\n\nobs<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="dropped the assistant message's content"):
        observation_suffix_text("no marker here", "MARK", ["<|im_end|>"])
    with pytest.raises(ValueError, match=re.escape("none of the end-of-turn tokens ['</s>']")):
        observation_suffix_text(chatml, "MARK", ["</s>"])


@pytest.mark.parametrize("template", ["chatml", "qwen3"])
def test_observation_tokens_continue_a_turn_exactly_as_the_chat_template_renders_the_conversation(template):
    tokenizer = tiny_tokenizer()
    if template == "qwen3":  # drops reasoning from earlier turns, and only before the last user message
        tokenizer.chat_template = qwen3_chat_template
    prompt = [{"role": "system", "content": "Be brief."}, user("What is 6 + 2?")]
    turn = tokenizer("5<|im_end|>", add_special_tokens=False)["input_ids"]
    start = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    played = (tokenizer(start, add_special_tokens=False)["input_ids"] + turn
              + observation_ids(tokenizer, prompt, OBSERVATION, [tokenizer.eos_token_id], {}))
    whole = tokenizer.apply_chat_template([*prompt, assistant("5"), user(OBSERVATION)], add_generation_prompt=True,
                                          tokenize=False)
    assert tokenizer.decode(played) == whole
    assert played == tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(observation_ids(tokenizer, "What is 6 + 2?", "Wrong.", [0], {})) == "\n\nWrong.\n\n"


def test_assistant_turns_are_the_runs_of_ones_in_the_env_mask():
    assert assistant_turn_spans([1, 1, 0, 0, 0, 1, 0, 1, 1]) == [(0, 2), (5, 6), (7, 9)]
    assert assistant_turn_spans([0, 1]) == [(1, 2)]
    assert assistant_turn_spans([]) == []
    with pytest.raises(ValueError, match="got 2 at position 1"):
        assistant_turn_spans([1, 2])


def test_a_successful_episode_demonstrates_its_final_answer():
    assert hindsight_demonstrations(["a", "b"], None) == ["a", "b"]
    assert hindsight_demonstrations(["turn1 obs turn2", "x"], ["turn2", None]) == ["turn2", "x"]
    with pytest.raises(ValueError, match="1 final answers for 2 completions"):
        hindsight_demonstrations(["a", "b"], ["a"])


def test_the_teacher_reads_a_siblings_final_answer_or_the_feedback_on_the_last_attempt(tokenizer):
    """Two groups of two episodes. Group 1: episode 0 failed twice, episode 1 solved on its second turn. Group 2:
    both failed; their last attempts got different feedback."""
    config = SDPOConfig()
    prompt = [user("What is 6 + 2?")]
    completions = ["5 | Wrong, try again. | 7", "5 | Wrong, try again. | 8", "1 | Wrong. | 2", "3 | Wrong. | 4"]
    answers = ["7", "8", "2", "4"]
    feedback = ["7 is wrong", "", "2 is wrong", "4 is wrong"]
    batch = build_teacher_batch([prompt] * 4, hindsight_demonstrations(completions, answers), [0.0, 1.0, 0.0, 0.0],
                                feedback, group_size=2, config=config, tokenizer=tokenizer)

    def expected(demonstration: str | None, fb: str | None) -> list[int]:
        solution = config.solution_template.format(successful_previous_attempt=demonstration) if demonstration else ""
        feedback_part = config.feedback_template.format(feedback_raw=fb) if fb else ""
        text = config.reprompt_template.format(prompt="What is 6 + 2?", solution=solution, feedback=feedback_part)
        return tokenizer.apply_chat_template([user(text)], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]

    with_feedback = not config.environment_feedback_only_without_solution
    assert batch.input_ids[0] == expected("8", "7 is wrong" if with_feedback else None)  # the answer, not the episode
    assert batch.sd_mask == [True, False, True, True]  # a lone success has no one to learn from
    assert batch.input_ids[2] == expected(None, "2 is wrong")
    assert batch.input_ids[3] == expected(None, "4 is wrong")


def test_only_one_environment_can_drive_an_episode():
    single = FakeEnvironment()
    assert check_rollout_arguments([single, lambda **kw: []], None, None) is None
    rollout = check_rollout_arguments([single, retry()], None, None)
    assert rollout.environment.max_turns == 3
    assert rollout.reward_function.__name__ == "Retry"
    with pytest.raises(ValueError, match=r"reward functions \['Retry', 'Retry'\] are all multi-turn"):
        check_rollout_arguments([retry(), retry()], None, None)
    with pytest.raises(ValueError, match="'Retry' has max_turns=3, so it plays the episodes itself; it cannot be "
                                         "combined with environment_factory"):
        check_rollout_arguments([retry()], None, lambda: None)
    single.max_turns = 2  # by hand, past configure_episodes' check
    with pytest.raises(ValueError, match=re.escape("environment 'FakeEnvironment' cannot run multi-turn episodes")):
        check_rollout_arguments([single], None, None)


def test_the_next_turns_conversation_and_pass_within_turns():
    assert conversation([user("q")], ["a1", "a2"], ["o1", "o2"]) == [user("q"), assistant("a1"), user("o1"),
                                                                     assistant("a2"), user("o2")]
    assert conversation("q", ["a1"], ["o1"]) == "q\n\na1\n\no1"
    assert pass_within_turns([1, None, 2, 3], 3) == {1: 0.25, 2: 0.5, 3: 0.75}
    with pytest.raises(ValueError, match="2 attempts but 1 observations"):
        conversation("q", ["a", "b"], ["o"])


# ------------------------------------------------------------------------ a model that answers, then retries
@pytest.fixture(scope="module")
def answering_weights():
    """Weights of a tiny model that answers every question "5" and, told to try again, "8"."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0)
    pairs = []
    for question in QUESTIONS:
        messages = [user(question)]
        pairs.append((tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), "5"))
        for answer in ("5", "8"):
            messages = [*messages, assistant(answer), user(OBSERVATION)]
            pairs.append((tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), "8"))
    fit_answers(model, tokenizer, [(context, target + "<|im_end|>") for context, target in pairs])
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def answering_model(answering_weights):
    model = tiny_model(tiny_tokenizer(), seed=0)
    model.load_state_dict(answering_weights)
    return model


def _rows(repeat: int = 1) -> list[dict]:
    return [{"prompt": [user(q)], "answer": a} for q, a in QUESTIONS.items() for _ in range(repeat)]


def _trainer(model, env, tmp_path, **sdpo) -> SDPOTrainer:
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, num_generations=2,
                      max_completion_length=192, max_steps=1, learning_rate=1e-3, temperature=0.1, report_to="none",
                      use_cpu=True, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                      dataloader_num_workers=0)
    return SDPOTrainer(model=model, reward_funcs=[env], args=args, train_dataset=Dataset.from_list(_rows()),
                       processing_class=tiny_tokenizer(), sdpo_config=SDPOConfig(**sdpo))


def test_episodes_are_played_turn_by_turn_with_the_observations_masked(answering_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tokenizer = tiny_tokenizer()
    trainer = _trainer(answering_model, retry(3), tmp_path)
    batch = trainer._generate_and_score_completions(_rows(2))
    records = trainer._episode_rollout.last_episodes
    assert [(r.answers, r.reward, r.feedback) for r in records[::2]] == [
        (["5"], 1.0, ""),  # 2 + 3: solved on the first turn
        (["5", "8"], 1.0, ""),  # 6 + 2: solved on the second, after the environment's feedback
        (["5", "8", "8"], 0.0, "The completion does not contain the answer (1 characters)."),  # 1 + 2: never
    ]
    observation = tokenizer("\n<|im_start|>user\n" + OBSERVATION + "<|im_end|>\n<|im_start|>assistant\n",
                            add_special_tokens=False)["input_ids"]
    answer = {a: tokenizer(a + "<|im_end|>", add_special_tokens=False)["input_ids"] for a in ("5", "8")}
    expected = [answer["5"], answer["5"] + observation + answer["8"],
                answer["5"] + observation + answer["8"] + observation + answer["8"]]
    for row, ids in enumerate(expected):
        real = batch["completion_mask"][2 * row].bool()
        assert batch["completion_ids"][2 * row][real].tolist() == ids
        env_mask = batch["tool_mask"][2 * row][real].tolist()
        spans = assistant_turn_spans(env_mask)
        assert [ids[a:b] for a, b in spans] == [answer[t] for t in records[2 * row].answers]
        assert sum(env_mask) == sum(len(answer[t]) for t in records[2 * row].answers)
    # the teacher: solved siblings demonstrate their final answer (not their episode); failed ones get feedback
    assert trainer._episode_rollout.reward_function.last_answers == ["5", "5", "8", "8", "8", "8"]
    assert batch["sd_mask"].tolist() == [1.0] * 6
    config = trainer.sdpo_config
    teacher = tokenizer.decode(batch["teacher_prompt_ids"][2][batch["teacher_prompt_mask"][2].bool()])
    assert config.solution_template.format(successful_previous_attempt="8") in teacher
    assert OBSERVATION not in teacher
    teacher = tokenizer.decode(batch["teacher_prompt_ids"][4][batch["teacher_prompt_mask"][4].bool()])
    assert config.feedback_template.format(feedback_raw=records[4].feedback) in teacher


@pytest.mark.parametrize("sdpo", [{}, {"full_logit_distillation": False, "alpha": 1.0}],
                         ids=["full-logit distillation from hidden states", "token-level reverse KL from logits"])
def test_observation_tokens_get_no_loss_and_no_gradient(answering_model, tmp_path, monkeypatch, sdpo):
    """The loss's own weights are 0 on observation tokens, so their per-token loss counts for nothing, and the
    gradient of the loss with respect to the student's final hidden states at the positions that predict them is
    exactly 0: an observation token reaches the loss only as context for the assistant turns after it."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from sdpo_core import loss as sdpo_loss

    trainer = _trainer(answering_model, retry(3), tmp_path, **sdpo)
    batch = trainer._generate_and_score_completions(_rows(2))
    tool_mask = batch["tool_mask"] * batch["completion_mask"]
    observed = (batch["completion_mask"] - tool_mask).bool()  # [B, T] observation tokens
    assert observed.sum() > 0
    assert batch["sd_mask"].sum() > 0

    seen = {}
    real_weights = sdpo_loss.aggregation_weights

    def weights(mask, **kwargs):  # each token's weight in the loss: the loss is Σ weight·ρ·ℓ
        seen["weights"] = real_weights(mask, **kwargs)
        return seen["weights"]

    monkeypatch.setattr(sdpo_loss, "aggregation_weights", weights)
    hidden = {}
    hook = trainer.model.model.norm.register_forward_hook(lambda module, args, out: hidden.setdefault("out", out))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, batch)
    hook.remove()
    out = hidden["out"]
    out.retain_grad()
    loss.backward()
    assert torch.all(seen["weights"][observed] == 0)
    prompt_length = batch["prompt_ids"].size(1)
    # hidden state at position prompt_length - 1 + j predicts completion token j
    grad = out.grad[:, prompt_length - 1:prompt_length - 1 + observed.size(1)].abs().sum(-1)  # [B, T]
    assert torch.all(grad[observed] == 0)
    assert grad[tool_mask.bool()].sum() > 0
    if not sdpo:  # the full-logit divergence has a gradient wherever teacher and student differ: every turn
        for row in batch["sd_mask"].nonzero(as_tuple=True)[0].tolist():
            spans = assistant_turn_spans(tool_mask[row][batch["completion_mask"][row].bool()].tolist())
            assert all(grad[row, start:end].sum() > 0 for start, end in spans), (row, spans)


def test_sdpo_trains_on_whole_episodes(answering_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = _trainer(answering_model, retry(3, error_reward=0.0), tmp_path)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["rewards/Retry/mean"] == pytest.approx(2 / 3)
    assert logged["sdpo/feedback_available_fraction"] > 0
    assert sorted(r.turns for r in trainer._episode_rollout.last_episodes) == [1, 1, 2, 2, 3, 3]
    assert logged["episodes/turns_mean"] == pytest.approx(2.0)
    assert [logged[f"episodes/solved_on_turn_{t}"] for t in (1, 2, 3)] == [pytest.approx(1 / 3)] * 2 + [0.0]
    assert (logged["episodes/failed_fraction"], logged["episodes/stopped_fraction"]) == (0.0, 0.0)


class RaisingRespond(Retry):
    def respond(self, task, history):
        raise KeyError("no such hint")


class HangingRespond(Retry):
    respond_timeout = 0.2

    def respond(self, task, history):
        time.sleep(3)
        return "late"


class MalformedRespond(Retry):
    def respond(self, task, history):
        return 42


class MalformedScore(Retry):
    def score(self, task, completion):
        return 1.0


class BadPrompt(Retry):
    def prompt(self, task):
        raise RuntimeError("no prompt for this task")


@pytest.mark.parametrize(("env_class", "reason"), [
    (RaisingRespond, "RaisingRespond.respond() raised KeyError: 'no such hint'"),
    (HangingRespond, "HangingRespond.respond() did not return within 0.2 s"),
    (MalformedRespond, "MalformedRespond.respond() returned int; expected a non-empty str"),
    (MalformedScore, "MalformedScore: step raised InvalidResultError: MalformedScore.score() returned float"),
    (BadPrompt, "BadPrompt: the episode could not start: RuntimeError: no prompt for this task"),
])
def test_a_broken_environment_gives_failed_episodes_not_a_crashed_step(answering_model, tmp_path, monkeypatch,
                                                                       env_class, reason):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    env = env_class(error_reward=-1.0)
    env.configure_episodes(max_turns=3)
    trainer = _trainer(answering_model, env, tmp_path)
    trainer.train()
    records = trainer._episode_rollout.last_episodes
    failed = [r for r in records if r.result.feedback.failed]
    assert failed, "no episode failed"
    for record in failed:
        assert record.reward == -1.0
        assert reason in (record.error or record.result.feedback.details["error"])
    assert env.error_count == len(failed)
    assert trainer.state.global_step == 1
    assert trainer.state.log_history[0]["episodes/failed_fraction"] == pytest.approx(len(failed) / len(records))


def test_an_episode_never_runs_past_max_turns(answering_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = _trainer(answering_model, retry(2), tmp_path)
    batch = trainer._generate_and_score_completions(_rows(2))
    last = trainer._episode_rollout.last_episodes[-1]
    assert (last.answers, last.reward, last.result.observation) == (["5", "8"], 0.0, None)
    real = batch["completion_mask"][-1].bool()
    assert len(assistant_turn_spans(batch["tool_mask"][-1][real].tolist())) == 2


def test_evaluation_reports_pass_within_each_number_of_turns(answering_model):
    tokenizer = tiny_tokenizer()
    tasks = [{"prompt": [user(q)], "answer": a} for q, a in QUESTIONS.items()]
    result = evaluate_model(answering_model, tokenizer, retry(3), tasks, max_new_tokens=8)
    assert result.pass_within_turns == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3)}
    assert (result.pass_at_k, result.turns_played) == ({1: pytest.approx(2 / 3)}, 1 + 2 + 3)
    assert result.to_dict()["pass_within_turns"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(2 / 3),
                                                     "3": pytest.approx(2 / 3)}
    single = evaluate_model(answering_model, tokenizer, FakeEnvironment(), tasks, max_new_tokens=8)
    assert (single.pass_within_turns, single.turns_played, single.pass_at_k) == ({}, 3, {1: pytest.approx(1 / 3)})



def test_a_multi_turn_environment_called_as_a_plain_reward_function_says_it_scores_single_attempts(caplog):
    env = retry(3)
    for _ in range(2):
        assert env(prompts=["What is 2 + 3?"], completions=["5"], answer=["5"]) == [1.0]
    warnings = [r.message for r in caplog.records if "scores each completion as one attempt" in r.message]
    assert warnings == ["Retry has max_turns=3, but as a reward function it scores each completion as one attempt; "
                        "SDPOTrainer(reward_funcs=[env]) plays whole episodes, and a plain GRPOTrainer can through "
                        "environment_factory(env)"]


class FormatFirst(Retry):
    """Reward 1 for the right answer, but success (which ends the episode) only when it is boxed."""

    def __init__(self, max_turns):
        super().__init__()
        self.configure_episodes(max_turns=max_turns)

    def score(self, task, completion):
        if task["answer"] not in completion:
            return Feedback(reward=0.0, text="Wrong.")
        if "boxed" not in completion:
            return Feedback(reward=1.0, text="Right, but put it in a box.")
        return Feedback(reward=1.0, success=True)


def test_a_task_is_solved_within_t_turns_when_one_of_its_first_t_attempts_solved_it():
    script = {"q1": ["5", "7", "boxed 5"], "q2": ["3", "boxed 4"], "q3": ["1", "2", "3"]}
    tasks = [{"prompt": [user(q)], "answer": a} for q, a in (("q1", "5"), ("q2", "4"), ("q3", "9"))]

    def generate(prompts, n):
        assert n == 1
        return [[script[p[0]["content"]][sum(m["role"] == "assistant" for m in p)]] for p in prompts]

    played = [e for per_task in play_episodes(FormatFirst(max_turns=3), tasks, num_samples=1, generate=generate)
              for e in per_task]
    assert [e.attempts for e in played] == [["5", "7", "boxed 5"], ["3", "boxed 4"], ["1", "2", "3"]]
    assert [e.solved_at(1.0) for e in played] == [1, 2, None]  # reward 1 on turn 1, whatever came after
    assert [e.solved_at(None) for e in played] == [3, 2, None]  # the environment's success flag
    assert played[0].observations == ["Right, but put it in a box. Try again.", "Wrong. Try again."]
    result = evaluate_episodes(FormatFirst(max_turns=3), tasks, ks=[1], num_samples=1, generate=generate,
                               success_threshold=1.0)
    assert result.pass_within_turns == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3)}
    assert (result.turns_played, result.mean_reward) == (8, pytest.approx(2 / 3))


def test_shortest_demonstration_selection_ranks_final_answers(answering_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tokenizer = tiny_tokenizer()
    trainer = _trainer(answering_model, retry(3), tmp_path, demo_selection="shortest")
    batch = trainer._generate_and_score_completions(_rows(2))
    teacher = tokenizer.decode(batch["teacher_prompt_ids"][2][batch["teacher_prompt_mask"][2].bool()])
    assert trainer.sdpo_config.solution_template.format(successful_previous_attempt="8") in teacher
    assert OBSERVATION not in teacher
