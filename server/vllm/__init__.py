"""What makes the server a drop-in vLLM replica beyond the OpenAI API: vLLM's metric names (metrics_aliases), the
/render endpoints routers call before routing (render), and prompt logprobs in vLLM's shape (prompt_logprobs)."""
