"""indexes for what every step reads: outputs by step id, open dead letters by step

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A step reads the outputs its templates name (``WHERE run_id = ? AND step_id IN
    # (...)``): by index, not by scanning every step of its run, so a step costs the same
    # at the end of a long run as at its start.
    op.create_index("lf_steps_step_id", "lf_steps", ["run_id", "step_id"])
    # A step that completes after a failed attempt looks for open dead letters of its
    # step key (in its run and up its retry chain): by index, not over the whole table.
    op.create_index("lf_dead_letters_open", "lf_dead_letters", ["step_key", "status"])


def downgrade() -> None:
    op.drop_index("lf_dead_letters_open", table_name="lf_dead_letters")
    op.drop_index("lf_steps_step_id", table_name="lf_steps")
