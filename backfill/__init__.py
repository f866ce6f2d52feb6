"""headwater.backfill"""
