"""Tool calling (issue #25): OpenAI tool definitions, Meta's and HF templates' prompt formats, Lark
grammars that constrain decoding to a call syntax, and one incremental parser of calls out of the
generated text. docs/tools.md describes the formats."""
