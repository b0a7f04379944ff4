"""A short batch script: several prompts through one pipeline, left-padded, greedy.

    python examples/batch.py

For large prompt files, resumable output and progress, use a job file instead:
``distlayer run examples/job.yaml`` (or ``distlayer.jobs.run_job("examples/job.yaml")``).
"""

from distlayer import AutoModel
from distlayer.smollm import resolve_model

questions = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 7 times 6?",
    "Translate 'good morning' into Spanish.",
]

model = AutoModel.from_pretrained(resolve_model("default"), stages=2)   # the embedded SmolLM2-135M-Instruct
tok = model.tokenizer                                                  # pads on the left
texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
         for q in questions]
enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=40,
                     return_dict_in_generate=True)
width = enc.input_ids.shape[1]
for q, seq, n in zip(questions, out.sequences, out.completion_tokens):
    print(f"Q: {q}\nA: {tok.decode(seq[width:width + n], skip_special_tokens=True).strip()}\n")
model.close()
