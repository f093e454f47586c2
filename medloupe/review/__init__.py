"""Review of a run's traced reasoning: reviewers' verdicts and the review page.

:mod:`medloupe.reviews` keeps verdicts (agree/disagree with a comment) in the run
directory; :mod:`medloupe.review.page` renders the self-contained trace-review page that
``medloupe serve`` shows at ``/runs/{id}`` and ``medloupe trace export RUN_ID --html`` writes.
"""

from __future__ import annotations

from medloupe.review.page import render_review_page
from medloupe.reviews import Review, ReviewIn, add_review, load_reviews

__all__ = ["Review", "ReviewIn", "add_review", "load_reviews", "render_review_page"]
