"""Evaluation metrics of generated text (pure torch/transformers; no ray).

- :mod:`models.evaluation.evaluator_lm`: the evaluator causal LM (SmolLM2-135M from a package, or a local HF dir)
- :mod:`models.evaluation.gen_ppl`: generative perplexity under the evaluator
- :mod:`models.evaluation.mauve_features`: evaluator last-token features and MAUVE (mauve-text)
- :mod:`models.evaluation.diversity`: unigram entropy, distinct-n
"""
from models.evaluation.diversity import distinct_n, unigram_entropy
from models.evaluation.evaluator_lm import (DEFAULT_EVALUATOR, Evaluator, EvaluatorUnavailable, load_evaluator,
                                            packaged_gguf_path)
from models.evaluation.gen_ppl import GenPPLResult, generative_perplexity
from models.evaluation.mauve_features import MauveResult, last_token_features, mauve_score

__all__ = ["DEFAULT_EVALUATOR", "Evaluator", "EvaluatorUnavailable", "GenPPLResult", "MauveResult", "distinct_n",
           "generative_perplexity", "last_token_features", "load_evaluator", "mauve_score", "packaged_gguf_path",
           "unigram_entropy"]
