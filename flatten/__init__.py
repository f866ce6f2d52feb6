"""headwater.flatten"""
