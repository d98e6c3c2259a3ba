"""Held-out evaluation: CE per segment, answer accuracy, teacher agreement (`evaluate`), greedy exact
match (`greedy`), where the heads look when the answer is written (`needle`) and evaluating a saved student
(`eval_student`, a command).

May import trainer.run, trainer.objective, trainer.data, pipeline and alignment; never trainer.ablation.
"""
