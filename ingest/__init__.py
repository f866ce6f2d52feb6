"""headwater.ingest"""
