"""Talk to `distlayer serve` with the official OpenAI client.

    distlayer serve default --stages 2          # in one terminal
    python examples/client.py                   # in another

The server speaks the OpenAI API, so any OpenAI client works: point its base URL at it.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    a = ap.parse_args()
    client = OpenAI(base_url=a.url, api_key=a.api_key)
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    print("Q: What is the capital of France?\nA:", answer.choices[0].message.content)
    print("\nStreaming a haiku:")
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Write a haiku about the sea."}], stream=True,
            max_tokens=60):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
