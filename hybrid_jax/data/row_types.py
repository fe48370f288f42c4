"""The row types of a training batch: what a row's `batch_type` int32 means.

Every row carries the type of its batch: mono (query and passage in one language), xy (two
different languages) or mixed (the ablation that mixes both kinds in one batch); a hybrid batch is
mono or xy. The id of a type is its index in ROW_TYPE_NAMES. One owner for names and ids: the
sampler writes the ids into batches and the loss sums per type by them (losses.BATCH_TYPE_NAMES is
this tuple), so the two cannot drift apart.

This module imports nothing, so the loss can use it without pulling in the data pipeline.
"""

ROW_TYPE_NAMES = ("mono", "xy", "mixed")  # index = the id written in the batch_type array
ROW_TYPE_IDS = {name: row_type_id for row_type_id, name in enumerate(ROW_TYPE_NAMES)}
