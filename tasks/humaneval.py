"""HumanEval: 164 Python functions to complete from their signature and docstring, as a generative task.

Hub: openai/openai_humaneval (split test). Local: humaneval/HumanEval.jsonl.gz under NANOCHAT_DATA_DIR. A completion
is never exec'd here: the program (the prompt's top-level imports, the completion's first fenced code block or its
whole text, the tests, then check(entry_point)) goes to nanochat.execution.execute_code, a sandboxed subprocess.
"""

import re

from tasks.common import Task, load_dataset_rows, local_path, read_jsonl

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion):
    """The first fenced code block (```python ... ```) of a completion, or the whole text when there is none."""
    match = CODE_BLOCK_RE.search(completion)
    return match.group(1) if match else completion


def extract_imports(prompt):
    """The prompt's top-level import block: its unindented `import` / `from` lines up to its first other statement
    (blank and comment lines skipped), which a completion may rely on without repeating them. An import indented
    inside the function (HumanEval/115) and a docstring line that starts with "from" (HumanEval/99, /129) are not
    in it: pasted at the top of the program they would be an IndentationError or nonsense."""
    imports = []
    for line in prompt.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line.startswith(("import ", "from ")):
            break
        imports.append(line)
    return imports


def build_program(conversation, completion):
    """The test program of one completion: imports, the completed code, the tests, the call to check."""
    imports = "\n".join(extract_imports(conversation["messages"][0]["content"]))
    return "\n\n".join([imports, extract_code(completion), conversation["test"],
                        f"check({conversation['entry_point']})", ""])


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_dataset_rows("openai/openai_humaneval", None, "test",
                                      lambda: read_jsonl(local_path("humaneval", "HumanEval.jsonl.gz")))

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def baseline(self, conversations):
        """0: a reply that ignores the question cannot pass. The tests call the problem's own function on several
        inputs with different expected outputs; a function returning any of 16 constants (None, True, False, 0, 1,
        -1, [], "", (), {}, 0.0, "Yes", "NO", "YES", "No") or its first argument passes none of the 164."""
        return 0.0

    def evaluate(self, conversation, assistant_response, timeout=5.0):
        from nanochat.execution import execute_code  # the sandbox; imported late so loading the task never needs it
        return execute_code(build_program(conversation, assistant_response), timeout=timeout).success
