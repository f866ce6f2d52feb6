"""headwater.deploy"""
