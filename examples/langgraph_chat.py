"""A LangGraph chatbot that streams its answers from this app's OpenAI-compatible endpoint.

    python app.py                                    # serves the model and http://127.0.0.1:7860/v1
    pip install langchain-openai langgraph
    python examples/langgraph_chat.py "What can you see in a rainbow?"   # one question
    python examples/langgraph_chat.py                                     # a chat in the terminal

Options: --base-url (default http://127.0.0.1:7860/v1), --api-key (the app's --api-key),
--model (default: the model the app serves), --max-tokens.
"""

import argparse

from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from openai import OpenAI


def build_chatbot(llm: ChatOpenAI):
    def answer(state: MessagesState):
        return {"messages": [llm.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("answer", answer)
    graph.add_edge(START, "answer")
    graph.add_edge("answer", END)
    return graph.compile(checkpointer=InMemorySaver())  # remembers the conversation per thread


def ask(chatbot, question: str, thread_id: str = "terminal") -> str:
    """Stream one answer to stdout, token chunk by token chunk; return it whole."""
    answer = ""
    for chunk, _ in chatbot.stream({"messages": [("user", question)]}, stream_mode="messages",
                                   config={"configurable": {"thread_id": thread_id}}):
        print(chunk.content, end="", flush=True)
        answer += chunk.content
    print()
    return answer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?")
    parser.add_argument("--base-url", default="http://127.0.0.1:7860/v1")
    parser.add_argument("--api-key", default="not-needed-on-localhost")
    parser.add_argument("--model")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    model = args.model or OpenAI(base_url=args.base_url, api_key=args.api_key).models.list().data[0].id
    llm = ChatOpenAI(base_url=args.base_url, api_key=args.api_key, model=model, temperature=0,
                     max_tokens=args.max_tokens, streaming=True)
    chatbot = build_chatbot(llm)
    if args.question:
        ask(chatbot, args.question)
        return
    while True:
        try:
            question = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if question:
            ask(chatbot, question)


if __name__ == "__main__":
    main()
