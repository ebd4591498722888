from raro_fast import prompts
from raro_fast.config import WarmupConfig
from raro_fast.tasks.countdown import CountdownConfig
from raro_fast.model.hf import load_project_tokenizer
from raro_fast.tasks.countdown import split_puzzles, verify
from raro_fast.warmup import warmup_corpus


def test_warmup_corpus_is_well_formed_and_never_uses_task_puzzles():
    tok = load_project_tokenizer()
    task = CountdownConfig(num_train=100, num_heldout=20)
    corpus = warmup_corpus(task, WarmupConfig(critic_fraction=0.5), tok, 256, batch_size=16)
    n_policy = n_critic = 0
    task_keys = {p.key for ps in split_puzzles(task) for p in ps}
    for ex in corpus:
        prompt = tok.decode(ex.input_ids[: ex.prompt_len])
        completion = tok.decode(ex.input_ids[ex.prompt_len :], skip_special_tokens=True)
        assert ex.input_ids[-1] == tok.eos_token_id
        assert "make 24." not in prompt  # never the task's target
        question = prompt.split("user\n", 1)[1]
        if "Answer 1:" in prompt:
            n_critic += 1
            q, a1, a2 = question.split("\n")[:3]
            q = q.removeprefix("Question: ")
            nums = tuple(int(x) for x in q.removeprefix("Using ").split(" each")[0].split(", "))
            target = int(q.rsplit("make ", 1)[1].rstrip(".").split("<")[0])
            a1, a2 = a1.removeprefix("Answer 1: "), a2.removeprefix("Answer 2: ").split("<")[0]
            ok1, ok2 = verify(nums, target, a1), verify(nums, target, a2)
            assert prompts.parse_verdict(completion) == ("tie" if ok1 == ok2 else "1" if ok1 else "2")
        else:
            n_policy += 1
            nums = tuple(int(x) for x in question.removeprefix("Using ").split(" each")[0].split(", "))
            target = int(question.rsplit("make ", 1)[1].split(".")[0])
            assert (tuple(sorted(nums)), target) not in task_keys
            assert verify(nums, target, prompts.parse_answer(completion))
    assert n_policy > 50 and n_critic > 50
