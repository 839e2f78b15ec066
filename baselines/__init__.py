"""The comparison methods of Table I (docs/method.md): DPSH, Triplet and DHCNN as training
methods (utils.method.Method subclasses); LSH and ITQ live in utils.hashing."""
