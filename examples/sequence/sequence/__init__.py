"""WASH on a sequence task of the example's own: do 12 digits sum above 54?"""
