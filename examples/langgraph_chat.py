"""A LangGraph chatbot that streams its answers from this app's OpenAI-compatible endpoint.

    python app.py                                    # serves the model and http://127.0.0.1:7860/v1
    pip install langchain-openai langgraph
    python examples/langgraph_chat.py "What can you see in a rainbow?"   # one question
    python examples/langgraph_chat.py                                     # a chat in the terminal
    python examples/langgraph_chat.py --with-tools "Weather in Paris?"    # an agent with a tool

Options: --base-url (default http://127.0.0.1:7860/v1), --api-key (the app's --api-key),
--model (default: the model the app serves), --max-tokens, --with-tools (the model may call
get_weather, which runs here, in this client: `bind_tools` and LangGraph's ToolNode; the app
returns the calls and never runs the client's tools). Tools need a model whose chat template
takes them in the Hermes format (Qwen2.5, Qwen3, ...).
"""

import argparse

from langchain_core.messages import AIMessageChunk, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from openai import OpenAI


@tool
def get_weather(city: str) -> str:
    """The weather in a city now.

    Args:
        city: The city's name.
    """
    return f"12 °C and sunny in {city}"  # a real agent would call a weather service here


def build_chatbot(llm: ChatOpenAI, tools: list | None = None):
    """answer → END, or with tools: answer → (a call?) tools → answer → ... → END."""
    model = llm.bind_tools(tools) if tools else llm

    def answer(state: MessagesState):
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("answer", answer)
    graph.add_edge(START, "answer")
    if tools:
        graph.add_node("tools", ToolNode(tools))
        graph.add_conditional_edges("answer", tools_condition)  # to "tools" when the model calls one
        graph.add_edge("tools", "answer")
    else:
        graph.add_edge("answer", END)
    return graph.compile(checkpointer=InMemorySaver())  # remembers the conversation per thread


def ask(chatbot, question: str, thread_id: str = "terminal") -> str:
    """Stream one answer to stdout, token chunk by token chunk (and each tool call with its
    result on a line of its own); return the answer's text."""
    answer = ""
    for chunk, _ in chatbot.stream({"messages": [("user", question)]}, stream_mode="messages",
                                   config={"configurable": {"thread_id": thread_id}}):
        if isinstance(chunk, ToolMessage):
            print(f"[tool {chunk.name} → {chunk.content}]", flush=True)
        elif isinstance(chunk, AIMessageChunk):
            for call in chunk.tool_call_chunks:
                if call.get("name"):
                    print(f"[calling {call['name']}{call.get('args') or ''}]", flush=True)
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
    parser.add_argument("--with-tools", action="store_true", help="the model may call get_weather (run here)")
    args = parser.parse_args()
    model = args.model or OpenAI(base_url=args.base_url, api_key=args.api_key).models.list().data[0].id
    llm = ChatOpenAI(base_url=args.base_url, api_key=args.api_key, model=model, temperature=0,
                     max_tokens=args.max_tokens, streaming=True)
    chatbot = build_chatbot(llm, [get_weather] if args.with_tools else None)
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
