"""One SDPO step in a 2-process gloo run (launched by tests/test_distributed.py through torchrun).

Rank 1's completions succeed and rank 0's fail, in a single group of 4 that spans both ranks, so rank 0's
teacher prompts must carry a demonstration that only rank 1 generated. Each rank writes what it saw.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from trl import GRPOConfig

from sdpo_core import SDPOConfig, SDPOTrainer
from sdpo_core.testing import tiny_model, tiny_tokenizer


def reward(prompts, completions, **kwargs):
    return [1.0 if dist.get_rank() == 1 else 0.0] * len(prompts)


def main(out_dir: str, gradient_checkpointing: bool) -> None:
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 2 + 3?"}]] * 8})
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=4, max_completion_length=6,
                      max_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                      logging_steps=1, gradient_checkpointing=gradient_checkpointing)
    trainer = SDPOTrainer(model=tiny_model(tokenizer), reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, sdpo_config=SDPOConfig())
    seen = []
    original = trainer._generate_and_score_completions

    def capture(inputs):
        output = original(inputs)
        seen.append({
            "teacher": [tokenizer.decode(ids[m.bool()]) for ids, m in
                        zip(output["teacher_prompt_ids"], output["teacher_prompt_mask"], strict=True)],
            "completions": tokenizer.batch_decode(output["completion_ids"], skip_special_tokens=True),
            "sd_mask": output["sd_mask"].tolist(),
        })
        return output

    trainer._generate_and_score_completions = capture
    trainer.train()
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
        json.dump({"batch": seen[0], "teacher_updates": trainer.teacher.updates, "checksum": checksum,
                   "hidden_state_path": trainer._hidden_state_path}, f)


if __name__ == "__main__":
    main(sys.argv[1], gradient_checkpointing=sys.argv[2] == "checkpointing")
