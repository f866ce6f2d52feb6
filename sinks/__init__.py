"""headwater.sinks"""
