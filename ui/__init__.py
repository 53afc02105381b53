"""The Gradio web chat: `lmq serve --ui` mounts it at /ui, `lmq ui --api-url URL` runs it alone."""
