"""The built-in example tasks: "digits" (a CNN on scikit-learn's 8x8 digits) and "gpt" (a byte-level
GPT on the Python standard library's source). Each module defines `TASK`; see dtrain.tasks."""
